"""Model editing runs: step 0 (the head), mask calibration, sparse centralized and federated fine-tuning.

Imports: the packages up to federated.
"""
