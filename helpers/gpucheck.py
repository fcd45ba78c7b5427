"""`python -m helpers.gpucheck`: every GPU check in one command (the command of helpers.ops.gpucheck)."""

import sys

from helpers.ops.gpucheck import main

if __name__ == "__main__":
    sys.exit(main())
