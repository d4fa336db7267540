"""The path ROS users take: colcon builds the ament_cmake package from a workspace src/.

The package is copied into a fresh workspace the way a user clones it, built with colcon
against the venv's ROS prefix, and the install space is used through its own setup script.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CHECK = textwrap.dedent("""
    import cgrs_ros, cgrs_ros.msg, cgrs_ros.action, cgrs_ros.engine.errors
    from ament_index_python.packages import get_package_share_directory
    from rclpy.serialization import deserialize_message, serialize_message
    from cgrs_ros.msg import Candidate
    msg = deserialize_message(serialize_message(Candidate(rank=3, image_id='x')), Candidate)
    assert (msg.rank, msg.image_id) == (3, 'x')
    for module in (cgrs_ros, cgrs_ros.msg, cgrs_ros.action, cgrs_ros.engine.errors):
        print(module.__file__)
    print(get_package_share_directory('cgrs_ros'))
""")


def _package_files():
    """Files a clone would have: tracked plus untracked-but-not-ignored."""
    out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def test_colcon_build_and_use_install_space(tmp_path):
    if shutil.which('colcon', path=os.path.dirname(sys.executable)) is None:
        pytest.skip('colcon is not installed in this environment (make setup installs it)')
    src = tmp_path / 'src' / 'cgrs_ros'
    for rel in _package_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)

    prefix = sys.prefix  # the venv holds the ROS wheels: it is the underlay
    env = dict(os.environ, AMENT_PREFIX_PATH=prefix, CMAKE_PREFIX_PATH=prefix,
               PATH=f'{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}')
    build = subprocess.run(
        ['colcon', 'build', '--event-handlers', 'console_direct-',
         '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=OFF',
         '-Wno-dev'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]

    install = tmp_path / 'install' / 'cgrs_ros'
    for rel in ('lib/cgrs_ros/retrieval_node', 'lib/cgrs_ros/captioning_node',
                'lib/cgrs_ros/cgrs', 'share/cgrs_ros/package.xml'):
        assert (install / rel).is_file(), f'{rel} missing from the install space'
    for rel in ('launch', 'config', 'models'):
        if (ROOT / rel).is_dir() and any((ROOT / rel).iterdir()):
            assert (install / 'share/cgrs_ros' / rel).is_dir(), f'share/cgrs_ros/{rel} missing'
    # The demo config names its learned model relative to itself: both are in share/.
    assert (install / 'share/cgrs_ros/models/demo_dual/cgrs_model.json').is_file()

    # Use the install space as a user does (source its setup script), from another folder.
    script = f'. "{tmp_path}/install/setup.sh" && exec "{sys.executable}" -c "$CHECK"'
    run = subprocess.run(['sh', '-c', script], cwd=tmp_path, env=dict(env, CHECK=CHECK),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.split()
    assert all(line.startswith(str(install)) for line in lines), lines

    cli = subprocess.run(['sh', '-c', f'. "{tmp_path}/install/setup.sh" && '
                          f'"{sys.executable}" "{install}/lib/cgrs_ros/cgrs" --version'],
                         env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith('cgrs ')
