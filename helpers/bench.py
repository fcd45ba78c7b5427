"""`python -m helpers.bench`: the speed benchmark (the command of helpers.ops.bench)."""

import sys

from helpers.ops.bench import main

if __name__ == "__main__":
    sys.exit(main())
