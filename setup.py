"""pip install of the cgrs engine and CLI (no ROS needed).

ROS users build the package with colcon instead (CMakeLists.txt), which also generates the
cgrs_ros.msg / cgrs_ros.action interfaces and installs the nodes.
"""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name):
    """Read one requirements file (the single list of engine dependencies)."""
    lines = (Path(__file__).parent / name).read_text().splitlines()
    return [line.split('#')[0].strip() for line in lines if line.split('#')[0].strip()]


setup(
    name='cgrs_ros',
    version='0.1.0',
    description='Caption-guided text-to-image geo-retrieval that sends a drone somewhere in words',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['cgrs_ros', 'cgrs_ros.*']),
    # The operator console's page (served by console_node; no CDN).
    package_data={'cgrs_ros.nodes.console': ['static/*']},
    install_requires=_requirements('requirements/engine.txt'),
    extras_require={'voice': _requirements('requirements/voice.txt')},
    entry_points={
        'console_scripts': [
            'cgrs = cgrs_ros.cli:main',
            'console_node = cgrs_ros.nodes.console_node:main',
        ],
    },
)
