"""Repair the CMake files exported by the ROS 2 PyPI wheels so interfaces build in this venv.

The wheels were built in a manylinux container, and their exported CMake files hard-code that
container's Python paths (``/opt/python/cp311-cp311/...``: include dir, library, interpreter).
cmake then fails to find Python.h when rosidl_generator_py builds our interfaces. This rewrites
those prefixes to the running interpreter's own paths. Idempotent; hand-written because no
tool exists for relocating these wheels.

Usage: python tools/repair_ros_wheels.py [PREFIX]   (PREFIX defaults to sys.prefix)
"""

import pathlib
import sys
import sysconfig


def repair(prefix):
    """Rewrite builder Python paths under PREFIX/share/*/cmake; return the files changed."""
    tag = f'cp{sys.version_info.major}{sys.version_info.minor}'
    version = f'{sys.version_info.major}.{sys.version_info.minor}'
    builder = f'/opt/python/{tag}-{tag}'
    paths = sysconfig.get_paths()
    # Longest first: site-packages (numpy's headers) before the bare prefix.
    replacements = [
        (f'{builder}/lib/python{version}/site-packages', paths['purelib']),
        (f'{builder}/include/python{version}', paths['include']),
        (builder, sysconfig.get_config_var('installed_base') or sys.base_prefix),
    ]
    changed = []
    for path in sorted(pathlib.Path(prefix, 'share').glob('*/cmake/**/*.cmake')):
        text = path.read_text()
        fixed = text
        for old, new in replacements:
            fixed = fixed.replace(old, new)
        if fixed != text:
            path.write_text(fixed)
            changed.append(path)
    return changed


if __name__ == '__main__':
    files = repair(sys.argv[1] if len(sys.argv) > 1 else sys.prefix)
    print(f'repair_ros_wheels: {len(files)} CMake file(s) repointed to this Python')
