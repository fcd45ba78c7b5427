"""Model editing's sparse machinery: the mask type and mask rules, sensitivity scores and multi-round
calibration, SparseSGDM, mask statistics.

Imports: core, data.
"""
