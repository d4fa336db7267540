"""The one ``main()`` every cgrs node shares: init, spin, clean shutdown, clear start-up errors."""

from cgrs_ros.engine.errors import CgrsError
import rclpy
from rclpy.exceptions import InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.executors import SingleThreadedExecutor


def spin_node(make_node, name, threads=1, args=None):
    """Create the node with ``make_node()``, spin it and shut down cleanly.

    ``threads`` > 1 spins a MultiThreadedExecutor (for nodes with reentrant callback groups).

    Returns the process exit code: 0 after Ctrl-C or an external shutdown, 2 when the node
    refused its start-up parameters or configuration (the reason is printed).
    """
    rclpy.init(args=args)
    executor = (MultiThreadedExecutor(num_threads=threads) if threads > 1
                else SingleThreadedExecutor())
    node = None
    try:
        node = make_node()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except InvalidParameterValueException as exc:
        print(f'{name}: invalid parameter: {exc}', flush=True)
        return 2
    except CgrsError as exc:
        print(f'{name}: {exc}', flush=True)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        executor.shutdown()
        if rclpy.ok():
            rclpy.shutdown()
    return 0
