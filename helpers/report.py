"""`python -m helpers.report`: the report's figures and tables from results/<profile>/ (helpers.reporting.report)."""

import sys

from helpers.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
