"""The federated round engine (clients sampled, trained, aggregated by the algorithm's server step), its
engine seam, stragglers, evaluation on the server or the clients.

Imports: every package above training, and training.
"""
