"""Style checks as ament packages run them: flake8 (ROS config), pep257, package.xml."""

import ast
import pathlib
import subprocess
import sys

from catkin_pkg.package import parse_package

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON_TREES = ['cgrs_ros', 'test', 'tools', 'scripts', 'launch', 'benchmarks', 'setup.py']


def _existing(paths):
    return [p for p in paths if (ROOT / p).exists()]


def test_flake8():
    """flake8 with the settings of ament_flake8 (setup.cfg): 99 columns, quotes, imports."""
    proc = subprocess.run([sys.executable, '-m', 'flake8', *_existing(PYTHON_TREES)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f'flake8 found problems:\n{proc.stdout}{proc.stderr}'


def test_pep257():
    """Docstrings on the public API, as ament_pep257 checks them."""
    proc = subprocess.run([sys.executable, '-m', 'pydocstyle', 'cgrs_ros'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f'pep257 found problems:\n{proc.stdout}{proc.stderr}'


def test_package_xml_is_valid_format_3():
    package = parse_package(str(ROOT / 'package.xml'))
    package.validate()
    assert package.package_format == 3
    assert package.name == 'cgrs_ros'
    assert package.get_build_type() == 'ament_cmake'


def _ros_packages_imported():
    """Top-level ROS packages (``*_msgs``, ``*_srvs``, rclpy, launch...) the sources import."""
    ros_like = ('rclpy', 'launch', 'launch_ros', 'ament_index_python')
    found = set()
    for path in (ROOT / 'cgrs_ros').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split('.')[0]
                if top in ros_like or top.endswith(('_msgs', '_srvs', '_interfaces')):
                    found.add(top)
    return found


def test_package_xml_lists_every_ros_dependency_the_code_imports():
    package = parse_package(str(ROOT / 'package.xml'))
    declared = {d.name for d in package.build_depends + package.exec_depends}
    missing = _ros_packages_imported() - declared
    assert not missing, f'add these to package.xml as <exec_depend>: {sorted(missing)}'
