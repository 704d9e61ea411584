"""`python -m keras_gramkd.export`: the export command line (and the child process)."""

import sys

from keras_gramkd.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
