"""`python -m keras_gramkd ...` runs the `gramkd` command."""

import sys

from keras_gramkd.cli import main

sys.exit(main())
