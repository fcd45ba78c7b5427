"""`python -m helpers.credentials`: a federation's CA, SuperLink certificate and node keys (flower.credentials)."""

import sys

from helpers.flower.credentials import main

if __name__ == "__main__":
    sys.exit(main())
