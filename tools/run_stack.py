"""`make run`: start the navigation stack on the bundled demo gallery."""

import sys

print('cgrs_ros: the navigation nodes are not built yet; `cgrs --help` lists what exists.')
sys.exit(0)
