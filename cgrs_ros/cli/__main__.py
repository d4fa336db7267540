"""``python -m cgrs_ros.cli``: the same as the ``cgrs`` command."""

import sys

from cgrs_ros.cli import main

sys.exit(main())
