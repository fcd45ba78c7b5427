"""Data on the device (CIFAR-100 or its synthetic stand-in, split, augmented in batches) and client shards.

Imports: core.
"""
