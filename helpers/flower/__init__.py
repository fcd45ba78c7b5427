"""The same clients on a Flower federation (optional: needs flwr): the apps, the server's and the node's halves,
reply checks, the secure federation's commands and credentials.

Imports: the packages up to editing.
"""
