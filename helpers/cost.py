"""`python -m helpers.cost`: the T4 hours and GPU memory of every notebook's plan (the command of helpers.ops.cost)."""

import sys

from helpers.ops.cost import main

if __name__ == "__main__":
    sys.exit(main())
