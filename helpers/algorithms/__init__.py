"""Federated algorithms, one module each (FedAvg is the base every remedy overrides), and their registry.

Imports: core, data, sparse.
"""
