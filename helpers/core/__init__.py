"""Foundations every other package stands on: seeding, models, precision, run-folder file I/O, downloads,
the process's caches, the notebooks' bootstrap, the parameter vocabulary and the environment settings.

Imports: nothing of helpers outside core.
"""
