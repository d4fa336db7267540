"""`make run`: the navigation stack on the bundled demo gallery.

Generates the demo world on first run (deterministic, into demo/world), then starts the
stack exactly as `ros2 launch cgrs_ros navigation.launch.py` would, through `cgrs launch`,
with the operator console on (console:=true), and says how to send a goal. Ctrl-C stops it.
Extra launch arguments pass through: `make run ARGS='log_level:=debug'`.
"""

import os
from pathlib import Path
import shlex
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / 'demo' / 'world'
CONFIG = ROOT / 'config' / 'demo_engine.yaml'


def cgrs(*args, **kwargs):
    """Run the cgrs CLI of this environment."""
    return subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', *args], **kwargs)


def main():
    """Prepare the demo world, print how to talk to the stack, and run it until Ctrl-C."""
    if not (WORLD / 'gallery.csv').is_file():
        print(f'==> generating the demo world into {WORLD} (first run only)', flush=True)
        cgrs('gallery', 'demo', str(WORLD), check=True)
    domain = os.environ.get('ROS_DOMAIN_ID', '0')
    print(f"""
==> starting the cgrs navigation stack on {WORLD}
    (ROS_DOMAIN_ID={domain}, discovery limited to this host; Ctrl-C stops it)

    In another shell, with the same environment:
      export ROS_DOMAIN_ID={domain} ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
      .venv/bin/cgrs goal "a round pond in a park next to a football pitch"
      .venv/bin/cgrs goal --json --platform satellite "the circular office building"
    or, with a ROS 2 install:
      ros2 topic pub --once /cgrs/goal_text std_msgs/msg/String "{{data: 'a parking lot'}}"
      ros2 topic echo /goal_pose

    Operator console (type a goal, see the candidates, confirm, watch the map):
      http://127.0.0.1:8080   (off with ARGS='console:=false')
""", flush=True)
    extra = shlex.split(os.environ.get('ARGS', ''))
    # exec, not a child: Ctrl-C and SIGTERM reach `cgrs launch` itself, which stops the nodes.
    os.execv(sys.executable, [sys.executable, '-m', 'cgrs_ros.cli', 'launch',
                              f'gallery_dir:={WORLD}', f'config:={CONFIG}', 'console:=true',
                              *extra])


if __name__ == '__main__':
    sys.exit(main())
