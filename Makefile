# The two commands of README.md: `make run` (the navigation stack on the demo gallery) and
# `make test`. Both set everything up first, from the package registries only.

VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.cgrs-setup-stamp
SETUP_INPUTS := tools/setup_env.sh tools/repair_ros_wheels.py setup.py CMakeLists.txt package.xml \
                $(wildcard requirements/*.txt msg/*.msg srv/*.srv action/*.action)

# ROS isolation for everything started from make: a random domain per invocation, discovery
# on this host only, logs out of $HOME, no model hub.
ROS_ENV = AMENT_PREFIX_PATH=$(abspath $(VENV)) \
          ROS_DOMAIN_ID=$${ROS_DOMAIN_ID:-$$(shuf -i 1-100 -n 1)} \
          ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST \
          ROS_LOG_DIR=$${ROS_LOG_DIR:-$$(mktemp -d -t cgrs-roslog-XXXXXX)} \
          HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

PYTEST_ARGS ?=

.PHONY: setup run demo test lint colcon-build bench clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@bash tools/setup_env.sh
	@touch $@

run: setup
	@$(ROS_ENV) ARGS="$(ARGS)" $(PY) tools/run_stack.py

# The whole loop: demo world, stack with the simulated drone, a few spoken goals flown.
# Options pass through: make demo DEMO_ARGS='--goals 2 --speed 30'.
demo: setup
	@$(ROS_ENV) $(PY) tools/demo.py $(DEMO_ARGS)

test: setup
	@$(ROS_ENV) $(PY) -m pytest test $(PYTEST_ARGS)

lint: setup
	@$(PY) -m pytest test/test_lint.py -q

# The path ROS users take: colcon building the ament_cmake package against the venv's ROS.
colcon-build: setup
	@$(ROS_ENV) $(PY) -m pytest test/test_colcon_build.py -q

bench: setup
	@$(ROS_ENV) $(PY) -m cgrs_ros.cli bench

clean:
	rm -rf build install log $(VENV)
