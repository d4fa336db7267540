"""Start the cgrs navigation stack: retrieval_node, captioning_node, and on request sim_drone
(sim:=true), localization_node (localization:=true), the operator console (console:=true) and
voice_node (voice:=true).

    ros2 launch cgrs_ros navigation.launch.py gallery_dir:=/data/my_gallery

The arguments, nodes, parameters and remappings come from cgrs_ros.nodes.stack, which
`cgrs launch` (for machines without launch_ros) reads too, so both start the same stack.
"""

from cgrs_ros.nodes import stack
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _nodes(context):
    values = stack.resolve_arguments(
        {arg.name: LaunchConfiguration(arg.name).perform(context)
         for arg in stack.launch_arguments()})
    return [
        Node(package=spec.package, executable=spec.executable, name=spec.name,
             namespace=spec.namespace, parameters=spec.parameters,
             remappings=spec.remappings, output='screen',
             arguments=['--ros-args', '--log-level', spec.log_level],
             respawn=spec.respawn, respawn_delay=spec.respawn_delay,
             respawn_max_retries=spec.respawn_max_retries,
             on_exit=Shutdown() if spec.required and not spec.respawn else None)
        for spec in stack.node_specs(values)
    ]


def generate_launch_description():
    """Declare the launch arguments, then start the nodes they describe."""
    arguments = [
        DeclareLaunchArgument(arg.name, default_value=arg.default, description=arg.description,
                              choices=list(arg.choices) or None)
        for arg in stack.launch_arguments()
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_nodes)])
