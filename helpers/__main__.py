"""`python -m helpers`: the command line (helpers.ops.cli)."""

import sys

from helpers.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
