"""Experiments' configs: every parameter with its type, range, meaning and defaults (algorithms declare their
own), validation before any compute, run ids.

Imports: core, data, sparse, algorithms.
"""
