"""Results to tables, figures and LaTeX, without torch: tidy results CSVs, labels, the report's figures and
tables, notebook plots.

Imports: core's torch-free modules (settings, params) only.
"""
