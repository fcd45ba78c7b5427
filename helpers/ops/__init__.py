"""Tools around the runs: the command line, each notebook's plan, cost and memory estimates, team status and
worker, papermill pipeline, benchmark, GPU check.

Imports: every package.
"""
