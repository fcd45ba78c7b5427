"""The one training loop, run folders (checkpoints, leases), the resumable-run skeleton, centralized runs.

Imports: core, data, sparse, algorithms, config.
"""
