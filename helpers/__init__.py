"""Federated Learning under the lens of model editing: the shared library behind the notebooks."""
