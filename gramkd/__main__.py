"""`python -m gramkd ...` runs the `gramkd` command."""

import sys

from gramkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
