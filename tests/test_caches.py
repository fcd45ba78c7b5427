"""helpers.core.caches: bounded, least recently used out first, one make() per key; load_data and the ImageNet
normalisation go through it (same object back for the same key)."""

from __future__ import annotations

import torch

from helpers.config.experiments import make_config
from helpers.core import caches
from helpers.data.datasets import eval_batch, load_data


def test_cache_is_a_bounded_lru_that_makes_each_value_once():
    cache, made = caches.Cache("test", 2), []

    def make(key):
        made.append(key)
        return [key]

    a = cache.get("a", lambda: make("a"))
    assert cache.get("a", lambda: make("a")) is a and made == ["a"]
    cache.get("b", lambda: make("b"))
    cache.get("a", lambda: make("a"))  # "a" is now the most recent, so "b" goes first
    cache.get("c", lambda: make("c"))
    assert len(cache) == 2 and list(cache.items) == ["a", "c"] and made == ["a", "b", "c"]
    cache.get("b", lambda: make("b"))
    assert made == ["a", "b", "c", "b"] and list(cache.items) == ["c", "b"]
    cache.clear()
    assert len(cache) == 0


def test_load_data_is_cached_per_data_config_and_device():
    caches.clear_all()
    config = make_config("centralized", "smoke", synthetic_train_size=300, synthetic_test_size=100)
    cpu = torch.device("cpu")
    data = load_data(config, cpu)
    assert load_data({**config, "lr": 1.0}, cpu) is data  # training parameters do not change the data
    other = load_data({**config, "data_seed": 1}, cpu)
    assert other is not data and not torch.equal(other.train_y, data.train_y)
    assert len(caches.DATA) == 2
    eval_batch(data.val_x[:2], img_size=32)
    assert len(caches.NORMALIZATION) == 1
    caches.clear_all()
    assert len(caches.DATA) == len(caches.FEATURES) == len(caches.NORMALIZATION) == 0
    reloaded = load_data(config, cpu)
    assert reloaded is not data and torch.equal(reloaded.train_x, data.train_x)  # rebuilt identically
