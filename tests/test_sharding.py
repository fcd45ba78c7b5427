"""Sharding properties (SPEC §5): disjoint, covering, exact Nc classes, balanced, seeded, clear errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from helpers.data.sharding import (
    dirichlet_shards,
    iid_shards,
    make_shards,
    noniid_shards,
    shard_class_counts,
    shard_stats,
)
from helpers.reporting.plots import plot_shard_stats

C, PER_CLASS, K = 100, 450, 100


@pytest.fixture(scope="module")
def cifar_labels():
    """CIFAR-100 train-split shaped labels: 450 of each of 100 classes, shuffled."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(C), PER_CLASS))


@pytest.fixture(scope="module")
def uneven_labels():
    """40 classes of 40 different sizes from 20 to 198 (20 + 37c mod 180), so nothing divides evenly."""
    return np.repeat(np.arange(40), 20 + (np.arange(40) * 37) % 180)


def assert_partition(shards, n):
    """Shards are int64, disjoint and their union is every index 0..n-1."""
    assert all(s.dtype == np.int64 for s in shards)
    everything = np.concatenate(shards)
    assert everything.size == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


def same_shards(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def classes_per_shard(labels, shards):
    return np.array([np.unique(labels[s]).size for s in shards])


def assert_no_sample_can_move(labels, shards, num_classes):
    """No chain of co-holders lets a client hand a sample on to a client 2 or more smaller.

    u can pass a sample to v when both hold a class and u has >= 2 of it (keeping one); a chain of such
    passes moves one sample from the chain's start to its end, so balanced shards admit no such chain.
    """
    counts = shard_class_counts(labels, shards, num_classes)
    sizes = counts.sum(axis=1)
    for start in range(len(shards)):
        seen, todo = {start}, [start]
        while todo:
            u = todo.pop()
            for c in np.flatnonzero(counts[u] >= 2):
                for v in np.flatnonzero(counts[:, c] > 0):
                    if v not in seen:
                        seen.add(v)
                        todo.append(v)
        assert sizes[start] - min(sizes[v] for v in seen) <= 1, f"client {start} could give to a smaller one"


def check_noniid(labels, k, nc, seed, num_classes):
    """Noniid shards for one seed after the checks every seed must pass; returns their sizes."""
    shards = noniid_shards(labels, k, nc, seed=seed)
    assert len(shards) == k
    assert_partition(shards, labels.size)
    assert (classes_per_shard(labels, shards) == nc).all()
    assert_no_sample_can_move(labels, shards, num_classes)
    return np.array([s.size for s in shards])


def test_iid_balanced_and_stratified(cifar_labels):
    shards = iid_shards(cifar_labels, K, seed=0)
    assert len(shards) == K
    assert_partition(shards, cifar_labels.size)
    sizes = np.array([s.size for s in shards])
    assert sizes.max() - sizes.min() <= 1
    counts = shard_class_counts(cifar_labels, shards, C)
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1  # every class spread evenly


def test_iid_uneven_sizes(uneven_labels):
    shards = iid_shards(uneven_labels, 7, seed=3)
    assert_partition(shards, uneven_labels.size)
    sizes = np.array([s.size for s in shards])
    assert sizes.max() - sizes.min() <= 1
    counts = shard_class_counts(uneven_labels, shards, 40)
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1


@pytest.mark.parametrize("nc", [1, 5, 10, 50])
def test_noniid_exact_classes_and_equal_sizes(cifar_labels, nc):
    shards = noniid_shards(cifar_labels, K, nc, seed=0)
    assert len(shards) == K
    assert_partition(shards, cifar_labels.size)
    assert (classes_per_shard(cifar_labels, shards) == nc).all()
    assert {s.size for s in shards} == {PER_CLASS}  # 45,000 / 100 exactly
    # Each class is held by exactly Nc clients (K = C), so no class is over- or under-represented.
    holders = (shard_class_counts(cifar_labels, shards, C) > 0).sum(axis=0)
    assert (holders == nc).all()


@pytest.mark.parametrize(("k", "nc", "spread"), [(30, 7, 1), (7, 6, 2), (13, 40, 1), (100, 3, 1)])
def test_noniid_uneven(uneven_labels, k, nc, spread):
    """Every seed balances to within `spread` samples: 1 is the best possible (4,280 samples divide by none of
    these K); with K=7, Nc=6 only 2 classes can be shared, so at least 5 clients keep exactly the classes they
    are given and the grouping is a partition problem, which the regrouping gets to within 2."""
    for seed in range(10):
        sizes = check_noniid(uneven_labels, k, nc, seed, 40)
        assert sizes.max() - sizes.min() <= spread, f"seed {seed}: sizes {sizes.min()}..{sizes.max()}"


@pytest.mark.parametrize("k, nc, lowest, highest", [(7, 15, 6412, 6450), (13, 9, 3461, 3462), (64, 11, 703, 704)])
def test_noniid_equal_classes_balanced_when_k_nc_is_not_a_multiple(cifar_labels, k, nc, lowest, highest):
    """Equal classes but K*Nc not a multiple of 100: some classes have one more holder, so holders get unequal
    shares and the classes must be regrouped. Every seed reaches the best split. K=7, Nc=15: 105 slots for 100
    classes leave 5 classes with 2 holders, and clients trade samples only through those, so 5 links join the 7
    clients into at least 2 groups; a group of m clients linked by m-1 classes holds (14m+1)*450 samples, i.e.
    6300 + 450/m each, and groups of 4 and 3 give the narrowest range, 6412-6450."""
    for seed in range(10):
        sizes = check_noniid(cifar_labels, k, nc, seed, C)
        assert lowest <= sizes.min() and sizes.max() <= highest, f"seed {seed}: sizes {sizes.min()}..{sizes.max()}"


def test_no_sample_can_move_check_catches_an_unbalanced_split(cifar_labels):
    # The checker above must fail when co-holders could still even out: move 2 samples of a shared class.
    shards = noniid_shards(cifar_labels, 13, 9, seed=0)
    counts = shard_class_counts(cifar_labels, shards, C)
    c = int(np.flatnonzero((counts > 0).sum(axis=0) >= 2)[0])
    a, b = np.flatnonzero(counts[:, c])[:2]
    moved = shards[a][cifar_labels[shards[a]] == c][:2]
    shards[a], shards[b] = np.setdiff1d(shards[a], moved), np.union1d(shards[b], moved)
    with pytest.raises(AssertionError, match="could give"):
        assert_no_sample_can_move(cifar_labels, shards, C)


def test_noniid_near_uniform_classes_within_one():
    # A stratified split can leave some classes with one extra sample; sizes must stay within 1.
    labels = np.concatenate([np.repeat(np.arange(C), PER_CLASS), np.arange(0, C, 3)])
    for nc in (1, 5, 50):
        sizes = np.array([s.size for s in noniid_shards(labels, K, nc, seed=0)])
        assert sizes.max() - sizes.min() <= 1


def test_noniid_accepts_torch_and_more_clients_than_classes():
    labels = torch.arange(10).repeat_interleave(30)
    shards = noniid_shards(labels, 25, 2, seed=0)
    assert_partition(shards, 300)
    assert (classes_per_shard(labels.numpy(), shards) == 2).all()
    assert {s.size for s in shards} == {12}


def test_dirichlet_partition_and_heterogeneity(cifar_labels):
    entropies = {}
    for alpha in (0.05, 1.0, 100.0):
        shards = dirichlet_shards(cifar_labels, K, alpha, seed=0, min_size=5)
        assert_partition(shards, cifar_labels.size)
        assert min(s.size for s in shards) >= 5
        entropies[alpha] = shard_stats(cifar_labels, shards, C)["entropy_bits"].mean()
    assert entropies[0.05] < entropies[1.0] < entropies[100.0]
    assert entropies[100.0] > 6.4  # close to log2(100) = 6.64: near-iid


def test_dirichlet_impossible_min_size_gives_clear_error():
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(ValueError, match="alpha"):  # a tiny alpha cannot give 50 clients >= 2 samples
        dirichlet_shards(labels, 50, 1e-3, seed=0, min_size=2)
    with pytest.raises(ValueError, match="min_size"):
        dirichlet_shards(labels, 50, 1.0, seed=0, min_size=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sharding": "iid"},
        {"sharding": "noniid", "classes_per_client": 5},
        {"sharding": "dirichlet", "alpha": 0.5},
    ],
)
def test_determinism(cifar_labels, kwargs):
    a = make_shards(cifar_labels, num_clients=K, seed=7, **kwargs)
    b = make_shards(cifar_labels, num_clients=K, seed=7, **kwargs)
    c = make_shards(cifar_labels, num_clients=K, seed=8, **kwargs)
    assert same_shards(a, b)
    assert not same_shards(a, c)


def test_make_shards_dispatch_ignores_other_parameters(cifar_labels):
    # Configs carry every key; parameters of other shardings must not matter.
    a = make_shards(cifar_labels, sharding="iid", num_clients=K, seed=1, classes_per_client=5, alpha=0.1)
    b = iid_shards(cifar_labels, K, 1)
    assert same_shards(a, b)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"sharding": "noniid", "num_clients": K, "classes_per_client": 0}, "classes_per_client"),
        ({"sharding": "noniid", "num_clients": K, "classes_per_client": C + 1}, "classes_per_client"),
        ({"sharding": "noniid", "num_clients": K, "classes_per_client": 2.0}, "classes_per_client"),
        ({"sharding": "noniid", "num_clients": 50, "classes_per_client": 1}, "classes_per_client"),
        ({"sharding": "noniid", "num_clients": K, "classes_per_client": None}, "classes_per_client"),
        ({"sharding": "iid", "num_clients": 0}, "num_clients"),
        ({"sharding": "iid", "num_clients": C * PER_CLASS + 1}, "num_clients"),
        ({"sharding": "noniid", "num_clients": C * PER_CLASS + 1, "classes_per_client": 1}, "num_clients"),
        ({"sharding": "dirichlet", "num_clients": C * PER_CLASS + 1, "alpha": 1.0}, "num_clients"),
        ({"sharding": "dirichlet", "num_clients": K, "alpha": 0.0}, "alpha"),
        ({"sharding": "dirichlet", "num_clients": K, "alpha": -1.0}, "alpha"),
        ({"sharding": "dirichlet", "num_clients": K, "alpha": float("nan")}, "alpha"),
        ({"sharding": "dirichlet", "num_clients": K}, "alpha"),
        ({"sharding": "pathological", "num_clients": K}, "sharding"),
    ],
)
def test_errors_name_the_parameter(cifar_labels, kwargs, param):
    with pytest.raises(ValueError, match=param):
        make_shards(cifar_labels, seed=0, **kwargs)


def test_error_message_gives_allowed_range(cifar_labels):
    with pytest.raises(ValueError, match=r"classes_per_client=101 is invalid: must be an integer in \[1, 100\]"):
        noniid_shards(cifar_labels, K, 101, seed=0)
    with pytest.raises(ValueError, match="iid, noniid, dirichlet"):
        make_shards(cifar_labels, sharding="IID", num_clients=K, seed=0)


def test_noniid_class_too_small_for_its_holders():
    labels = np.array([0] * 50 + [1] * 2)  # class 1 can be held by at most 2 of 10 clients
    with pytest.raises(ValueError, match="classes_per_client"):
        noniid_shards(labels, 10, 2, seed=0)


def test_shard_stats_consistent(cifar_labels):
    shards = noniid_shards(cifar_labels, K, 5, seed=0)
    stats = shard_stats(cifar_labels, shards)
    assert isinstance(stats, pd.DataFrame)
    assert list(stats.columns) == ["client", "size", "num_classes", "entropy_bits", "top_class_fraction"]
    assert list(stats["client"]) == list(range(K))
    assert list(stats["size"]) == [s.size for s in shards]
    assert (stats["num_classes"] == 5).all()
    counts = shard_class_counts(cifar_labels, shards, C)
    p = counts[0][counts[0] > 0] / counts[0].sum()
    assert stats["entropy_bits"][0] == pytest.approx(-(p * np.log2(p)).sum())
    assert stats["top_class_fraction"][0] == pytest.approx(p.max())
    assert (stats["entropy_bits"] <= np.log2(5) + 1e-9).all()
    one = shard_stats(cifar_labels, noniid_shards(cifar_labels, K, 1, seed=0))
    assert (one["entropy_bits"] == 0).all() and (one["top_class_fraction"] == 1).all()


def test_plot_returns_figure(cifar_labels):
    shards = dirichlet_shards(cifar_labels, 20, 0.3, seed=0)
    fig = plot_shard_stats(torch.from_numpy(cifar_labels), shards, num_classes=C, title="dirichlet 0.3")
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert axes[0].get_xlabel() == "class" and axes[0].get_ylabel() == "client"
    assert any(ax.get_xlabel().startswith("shard size") for ax in axes)
    fig.canvas.draw()  # renders headless
