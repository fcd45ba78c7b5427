"""Client shards of the train split: iid, non-iid with exactly Nc classes per client, and Dirichlet.

Every sharder returns a list of K sorted int64 index arrays (positions into `labels`) that are disjoint
and together cover every sample. Shards are drawn once per run from `numpy_rng(seed, "shards", ...)`,
so the same seed always gives the same shards (they are never re-drawn per round, SPEC §5, §12).
"""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd

from helpers.core.seeding import numpy_rng
from helpers.data.noniid_groups import regroup

SHARDINGS = ("iid", "noniid", "dirichlet")
DIRICHLET_MAX_ATTEMPTS = 1000
REGROUP_TRIES = 8  # random restarts of the non-iid class grouping when class shares differ
REGROUP_PAIR_BUDGET = 10_000  # client pairs the regrouping may examine per call (bounds its time at large K)


# ----------------------------------------------------------------------------- validation


def as_labels(labels) -> np.ndarray:
    """Labels as a 1-D int64 numpy array (accepts numpy arrays, torch tensors and sequences)."""
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):  # torch.Tensor, without importing torch
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must hold integer class ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels must be non-negative class ids, got min {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _is_int(value) -> bool:
    # bool is an int subclass but `num_clients=True` is always a bug.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_num_clients(num_clients, num_samples: int) -> int:
    if not _is_int(num_clients) or not 1 <= num_clients <= num_samples:
        raise ValueError(
            f"num_clients={num_clients!r} is invalid: must be an integer in [1, {num_samples}] (the number of samples)"
        )
    return int(num_clients)


def _check_seed(seed) -> int:
    if not _is_int(seed):
        raise ValueError(f"seed={seed!r} is invalid: must be an integer")
    return int(seed)


# ----------------------------------------------------------------------------- iid


def iid_shards(labels, num_clients: int, seed: int) -> list[np.ndarray]:
    """K shards whose sizes differ by at most 1 and whose per-class counts differ by at most 1.

    Stratified: shuffle within each class, concatenate the classes, deal the result round robin.
    """
    y = as_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    rng = numpy_rng(_check_seed(seed), "shards", "iid")
    # Dealing one continuous class-sorted sequence round robin balances totals and every class at once.
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    owner = rng.permutation(k)[np.arange(order.size) % k]  # random client ids get the +1 leftovers
    by_owner = order[np.argsort(owner, kind="stable")]  # one sort, not K scans over all samples
    return [np.sort(s) for s in np.split(by_owner, np.cumsum(np.bincount(owner, minlength=k))[:-1])]


# ----------------------------------------------------------------------------- non-iid (Nc classes)


def _class_demand(counts: np.ndarray, num_clients: int, classes_per_client: int, rng) -> np.ndarray:
    """How many clients hold each class: K*Nc holder slots shared in proportion to class sizes.

    Every class gets one holder, then each further slot goes to the class whose holders would get the
    most samples (counts / demand, random tie-break), which minimises the largest per-holder share. With
    equal-sized classes this is floor/ceil of K*Nc/C, the extra holders going to random classes.
    """
    demand = np.ones(counts.size, dtype=np.int64)
    cap = np.minimum(num_clients, counts)  # a class cannot have more holders than clients or samples
    tie = rng.random(counts.size)
    heap = [(-float(counts[c]), tie[c], c) for c in range(counts.size) if cap[c] > 1]
    heapq.heapify(heap)
    for _ in range(num_clients * classes_per_client - counts.size):
        _, t, c = heapq.heappop(heap)  # cannot run dry: the caller checked sum(cap) >= K*Nc
        demand[c] += 1
        if demand[c] < cap[c]:
            heapq.heappush(heap, (-counts[c] / demand[c], t, c))
    return demand


def _assign_classes(demand: np.ndarray, num_clients: int, classes_per_client: int, rng) -> np.ndarray:
    """K x Nc class ids, Nc distinct per client, class c used by exactly demand[c] clients.

    Greedy: each client takes the Nc classes with the largest remaining demand (random tie-break). This
    always succeeds when max(demand) <= remaining clients and sum(demand) = K*Nc (Gale-Ryser).
    """
    remaining = demand.astype(np.float64)
    assignment = np.empty((num_clients, classes_per_client), dtype=np.int64)
    for k in range(num_clients):
        key = remaining + rng.random(remaining.size)  # integer part = demand, fraction = tie-break
        top = np.argpartition(-key, classes_per_client - 1)[:classes_per_client]
        if (remaining[top] <= 0).any():  # cannot happen given the invariant above; guard the invariant
            raise RuntimeError("internal error: class assignment ran out of demand")
        remaining[top] -= 1
        assignment[k] = np.sort(top)
    return assignment


def _best_grouping(holds: np.ndarray, counts: np.ndarray, demand: np.ndarray, nc: int, rng) -> np.ndarray:
    """The most balanced of REGROUP_TRIES regrouped assignments (this one, then fresh ones from rng).

    Sizes are judged after balancing the samples (a group joined by one small class cannot share much);
    stops at a spread of 1 (0 when the samples divide evenly), which no grouping can beat.
    """
    k = holds.shape[0]
    best, best_key, floor = holds, None, int(counts.sum() % k > 0)
    scans = REGROUP_PAIR_BUDGET // (k * (k - 1) // 2)  # passes over all client pairs, over all attempts
    for attempt in range(2 * REGROUP_TRIES):  # even attempts: as drawn, odd: after regroup
        if attempt % 2:
            if scans == 0:
                break
            holds = holds.copy()
            scans -= regroup(holds, counts, demand, max_scans=min(4 * k, scans))
        elif attempt:
            holds = np.zeros_like(holds)
            holds[np.arange(k)[:, None], _assign_classes(demand, k, nc, rng)] = True
        totals = _balance_counts(_even_split(holds, counts), holds).sum(axis=1)
        key = (int(np.ptp(totals)), int((totals.astype(np.float64) ** 2).sum()))
        if best_key is None or key < best_key:
            best, best_key = holds, key
        if key[0] <= floor:
            break
    return best


def _even_split(holds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """K x C sample counts: each class split evenly among its holders, the first holders taking the remainder."""
    d = holds.sum(axis=0)
    rank = np.cumsum(holds, axis=0) - 1  # a holder's rank among its class's holders
    return np.where(holds, counts // d + (rank < counts % d), 0).astype(np.int64)


def _balance_counts(x: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """Move samples between holders of the same classes until client totals are as equal as possible.

    x: K x C counts (>= 1 where held). A unit can move from client a to client b along a path
    a -c1- k1 -c2- ... -b where each giver keeps at least 1 sample of the class. Moving from a larger to
    a smaller-by-2 total lowers the sum of squares, so this terminates; when no such path exists the
    totals are the most balanced possible for this class assignment (min max and max min at once).
    """
    k_clients, n_classes = x.shape
    totals = x.sum(axis=1)
    while totals.max() - totals.min() >= 2:
        for a in np.argsort(-totals, kind="stable"):
            if totals[a] - totals.min() < 2:
                return x
            path = _push_path(x, holds, int(a))
            b = path[0][1] if path else a
            if totals[a] - totals[b] < 2:
                continue
            delta = min(min(x[u, c] - 1 for u, _, c in path), (totals[a] - totals[b]) // 2)
            for u, v, c in path:
                x[u, c] -= delta
                x[v, c] += delta
            totals[a] -= delta
            totals[b] += delta
            break
        else:  # no client can hand samples to a client 2 or more below it: balanced
            return x
    return x


def _push_path(x: np.ndarray, holds: np.ndarray, a: int) -> list[tuple[int, int, int]]:
    """BFS from client a to the smallest-total client reachable by giving samples; [(giver, taker, class)].

    Edge u -> v via class c when u holds >= 2 samples of c (keeps one) and v holds c. Vectorised per level.
    """
    totals = x.sum(axis=1)
    can_give = (x >= 2) & holds
    seen_client = np.zeros(x.shape[0], dtype=bool)
    seen_class = np.zeros(x.shape[1], dtype=bool)
    via_class = np.full(x.shape[0], -1)  # class through which a client was reached
    from_client = np.full(x.shape[1], -1)  # client that gives a class
    seen_client[a] = True
    frontier = np.array([a])
    while frontier.size:
        cand = can_give[frontier] & ~seen_class
        new_c = cand.any(axis=0)
        if not new_c.any():
            break
        from_client[new_c] = frontier[cand[:, new_c].argmax(axis=0)]
        seen_class |= new_c
        cand_v = holds[:, new_c] & ~seen_client[:, None]
        new_v = cand_v.any(axis=1)
        via_class[new_v] = np.flatnonzero(new_c)[cand_v[new_v].argmax(axis=1)]
        seen_client |= new_v
        frontier = np.flatnonzero(new_v)
    reached = np.flatnonzero(seen_client)
    b = int(reached[np.argmin(totals[reached])])
    path = []
    v = b
    while v != a:
        c = int(via_class[v])
        u = int(from_client[c])
        path.append((u, v, c))
        v = u
    return path


def noniid_shards(labels, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """K shards, each holding exactly `classes_per_client` distinct classes, sizes as equal as possible.

    Every sample is used exactly once. With 450 samples in each of 100 classes and K=100 every shard has 450.
    """
    y = as_labels(labels)
    classes, counts = np.unique(y, return_counts=True)
    n_classes = classes.size
    k = _check_num_clients(num_clients, y.size)
    nc = classes_per_client
    if not _is_int(nc) or not 1 <= nc <= n_classes:
        raise ValueError(
            f"classes_per_client={nc!r} is invalid: must be an integer in [1, {n_classes}] "
            "(the number of classes present in labels)"
        )
    nc = int(nc)
    if k * nc < n_classes:
        need = -(-n_classes // k)
        raise ValueError(
            f"classes_per_client={nc} with num_clients={k} is invalid: num_clients * classes_per_client "
            f"must be >= {n_classes} (the number of classes) or some samples could not be used; "
            f"use classes_per_client >= {need} or num_clients >= {-(-n_classes // nc)}"
        )
    slots = int(np.minimum(k, counts).sum())
    if slots < k * nc:  # every holder needs at least one sample of each of its classes
        raise ValueError(
            f"classes_per_client={nc} with num_clients={k} is invalid: it needs {k * nc} (client, class) "
            f"pairs but the classes can fill only {slots} (a class with n samples has at most n holders); "
            "lower num_clients or classes_per_client"
        )
    rng = numpy_rng(_check_seed(seed), "shards", "noniid")
    demand = _class_demand(counts, k, nc, rng)

    assignment = _assign_classes(demand, k, nc, rng)
    holds = np.zeros((k, n_classes), dtype=bool)
    holds[np.arange(k)[:, None], assignment] = True
    # Holders of different classes get different shares: regroup (with one class each, or all, there is no
    # other grouping: swapping a client's only class just relabels the clients).
    if np.ptp(counts / demand) > 0 and 1 < nc < n_classes:
        holds = _best_grouping(holds, counts, demand, nc, numpy_rng(seed, "shards", "noniid", "regroup"))

    # Start from an even split of each class among its holders (exact when classes are equal-sized and
    # evenly shared), then balance the client totals by moving samples between co-holders.
    x = np.zeros((k, n_classes), dtype=np.int64)
    for c in range(n_classes):
        holders = np.flatnonzero(holds[:, c])
        q, r = divmod(int(counts[c]), holders.size)
        share = np.full(holders.size, q, dtype=np.int64)
        share[rng.permutation(holders.size)[:r]] += 1
        x[holders, c] = share
    x = _balance_counts(x, holds)

    pieces: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == classes[c]))
        holders = np.flatnonzero(holds[:, c])
        for holder, part in zip(holders, np.split(idx, np.cumsum(x[holders, c])[:-1]), strict=True):
            pieces[holder].append(part)
    return [np.sort(np.concatenate(p)) for p in pieces]


# ----------------------------------------------------------------------------- Dirichlet


def dirichlet_shards(labels, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Hsu et al. 2019: each class is split among the K clients with proportions ~ Dir(alpha * 1_K).

    Draws again (up to DIRICHLET_MAX_ATTEMPTS times) until every client has at least `min_size` samples.
    """
    y = as_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ValueError(f"alpha={alpha!r} is invalid: must be a finite number > 0")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} is invalid: must be a finite number > 0")
    if not _is_int(min_size) or not 0 <= min_size * k <= y.size:
        raise ValueError(
            f"min_size={min_size!r} is invalid: must be an integer in [0, {y.size // k}] "
            f"(the number of samples / num_clients={k})"
        )
    rng = numpy_rng(_check_seed(seed), "shards", "dirichlet")
    classes, counts = np.unique(y, return_counts=True)

    for _ in range(DIRICHLET_MAX_ATTEMPTS):
        p = rng.dirichlet(np.full(k, float(alpha)), size=classes.size)  # C x K
        if not np.isfinite(p).all():  # tiny alpha can underflow; treat as a failed draw
            continue
        cum = np.cumsum(p, axis=1)
        cum[:, -1] = 1.0  # float round-off must not drop the last samples of a class
        cuts = np.floor(cum * counts[:, None]).astype(np.int64)
        split = np.diff(cuts, axis=1, prepend=0)  # C x K sample counts
        if split.sum(axis=0).min() >= min_size:
            break
    else:
        raise ValueError(
            f"alpha={alpha} with num_clients={k} is invalid: no split gave every client >= {min_size} "
            f"samples in {DIRICHLET_MAX_ATTEMPTS} draws; use a larger alpha, fewer clients or a smaller "
            "min_size"
        )

    pieces: list[list[np.ndarray]] = [[] for _ in range(k)]
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        for client, part in enumerate(np.split(idx, cuts[ci, :-1])):
            pieces[client].append(part)
    return [np.sort(np.concatenate(p)) for p in pieces]


# ----------------------------------------------------------------------------- dispatch and stats


def make_shards(
    labels,
    *,
    sharding: str,
    num_clients: int,
    seed: int,
    classes_per_client: int | None = None,
    alpha: float | None = None,
) -> list[np.ndarray]:
    """Shards for `sharding` in {"iid", "noniid", "dirichlet"}; parameters of other shardings are ignored."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r} is invalid: must be one of {', '.join(SHARDINGS)}")
    if sharding == "iid":
        return iid_shards(labels, num_clients, seed)
    if sharding == "noniid":
        if classes_per_client is None:
            raise ValueError("classes_per_client is required for sharding='noniid' (an integer >= 1)")
        return noniid_shards(labels, num_clients, classes_per_client, seed)
    if alpha is None:
        raise ValueError("alpha is required for sharding='dirichlet' (a number > 0)")
    return dirichlet_shards(labels, num_clients, alpha, seed)


def config_shards(config: dict, labels) -> list[np.ndarray]:
    """make_shards with a run config's sharding, clients, seed, Nc and alpha."""
    return make_shards(
        labels, sharding=config["sharding"], num_clients=config["num_clients"], seed=config["seed"],
        classes_per_client=config["classes_per_client"], alpha=config["dirichlet_alpha"],
    )  # fmt: skip


def shard_class_counts(labels, shards, num_classes: int) -> np.ndarray:
    """K x C matrix: counts[k, c] = samples of class c in shard k."""
    y = as_labels(labels)
    if y.max() >= num_classes:
        raise ValueError(f"num_classes={num_classes} is invalid: labels go up to {y.max()}")
    return np.stack([np.bincount(y[np.asarray(s, dtype=np.int64)], minlength=num_classes) for s in shards])


def shard_stats(labels, shards, num_classes: int | None = None) -> pd.DataFrame:
    """One row per client: client, size, num_classes (distinct), entropy_bits, top_class_fraction."""
    y = as_labels(labels)
    counts = shard_class_counts(y, shards, int(y.max()) + 1 if num_classes is None else num_classes)
    sizes = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # empty shards give NaN fractions, by design
        p = counts / sizes[:, None]
        entropy = -np.where(counts > 0, p * np.log2(np.where(counts > 0, p, 1.0)), 0.0).sum(axis=1)
        top = counts.max(axis=1) / sizes
    return pd.DataFrame(
        {
            "client": np.arange(len(shards)),
            "size": sizes,
            "num_classes": (counts > 0).sum(axis=1),
            "entropy_bits": entropy + 0.0,  # + 0.0 turns -0.0 into 0.0
            "top_class_fraction": top,
        }
    )
