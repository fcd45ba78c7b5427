"""Regrouping the classes of non-iid shards: which clients hold which classes, so that sizes can balance.

Clients can only trade samples of classes they share, so clients linked by shared classes form groups whose
samples can be evened out; `regroup` swaps classes between clients to make those groups (and the clients'
expected loads) as even as possible. Holdings are a K x C bool matrix; shared classes have demand > 1.
"""

from __future__ import annotations

import numpy as np


def _reach(linked: np.ndarray, start: int) -> np.ndarray:
    """Clients connected to `start` through classes they share (linked: K x C, shared classes only)."""
    reach = np.zeros(linked.shape[0], dtype=bool)
    reach[start] = True
    frontier = reach.copy()
    while frontier.any():
        new = linked[:, linked[frontier].any(axis=0)].any(axis=1) & ~reach
        reach |= new
        frontier = new
    return reach


def _groups(linked: np.ndarray) -> np.ndarray:
    """Group id per client: clients linked by shared classes, the only ones that can trade samples."""
    group = np.full(linked.shape[0], -1)
    for u in range(linked.shape[0]):
        if group[u] < 0:
            group[_reach(linked, u)] = group.max() + 1
    return group


def regroup(holds: np.ndarray, counts: np.ndarray, demand: np.ndarray, max_scans: int) -> int:
    """Swap classes between any two clients while that lowers F + L (steepest descent); in place.

    Stops after max_scans passes over all client pairs (one pass per swap); returns the passes made.

    F = sum over groups of (mass - size*mean)^2 / size: what the client sizes would be if every group shared
    its samples out evenly (so it rewards merging groups). L = sum over clients of (load - mean)^2 with
    load = sum of counts/demand over held classes: a client holding only big classes alone cannot shed them.
    """
    n = counts.astype(np.float64)
    shared = demand > 1
    share = n / demand
    mean = n.sum() / holds.shape[0]
    for scan in range(1, max_scans + 1):
        linked = holds & shared
        group = _groups(linked)
        mass = np.bincount(group[holds.argmax(axis=0)], weights=n)
        size = np.bincount(group).astype(np.float64)
        load = holds @ share - mean
        cut = _cuts(holds, linked, n)
        best, move = -1e-6, None
        for a, b in zip(*np.triu_indices(holds.shape[0], 1)):
            give, take = np.flatnonzero(holds[a] & ~holds[b]), np.flatnonzero(holds[b] & ~holds[a])
            delta = share[give][:, None] - share[take][None, :]  # a's load drop
            gain = (load[a] - delta) ** 2 + (load[b] + delta) ** 2 - load[a] ** 2 - load[b] ** 2
            ga, gb = group[a], group[b]
            if ga == gb:  # F is unchanged unless the group splits: allow only swaps that keep it whole
                gain[shared[give][:, None] & shared[take][None, :]] = np.inf
                for i, c in enumerate(give):
                    if (a, c) in cut and not cut[(a, c)][2][b]:
                        gain[i, ~shared[take]] = np.inf
                for j, c in enumerate(take):
                    if (b, c) in cut and not cut[(b, c)][2][a]:
                        gain[~shared[give], j] = np.inf
            else:
                ea, eb = mass[ga] - size[ga] * mean, mass[gb] - size[gb] * mean  # excess over the mean
                moved = n[give][:, None] - n[take][None, :]  # mass a's group loses if both classes are private
                f = ((ea - moved) ** 2 - ea**2) / size[ga] + ((eb + moved) ** 2 - eb**2) / size[gb]
                groups, before = ((mass[ga], size[ga]), (mass[gb], size[gb])), ea**2 / size[ga] + eb**2 / size[gb]
                for i, j in zip(*np.nonzero(shared[give][:, None] | shared[take][None, :])):  # may merge or split
                    parts = _swap_pieces(a, give[i], b, take[j], *groups, shared, n, cut)
                    f[i, j] = sum((m - s * mean) ** 2 / s for m, s in parts) - before
                gain += f
            if gain.size and gain.min() < best:
                i, j = np.unravel_index(np.argmin(gain), gain.shape)
                best, move = gain[i, j], (a, give[i], b, take[j])
        if move is None:
            return scan
        a, c1, b, c2 = move
        holds[a, c1], holds[a, c2], holds[b, c2], holds[b, c1] = False, True, False, True
    return max_scans


def _cuts(holds: np.ndarray, linked: np.ndarray, n: np.ndarray) -> dict:
    """(client u, shared class c) -> (mass, size, clients) of u's part of its group if u leaving c cuts it off."""
    cut = {}
    for u, c in zip(*np.nonzero(linked)):
        linked[u, c] = holds[u, c] = False
        part = _reach(linked, u)
        if not (part & linked[:, c]).any():
            cut[(u, c)] = (n @ holds[part].any(axis=0), part.sum(), part)
        linked[u, c] = holds[u, c] = True
    return cut


def _swap_pieces(a, c1, b, c2, group_a, group_b, shared, n, cut) -> list[tuple[float, float]]:
    """(mass, size) of the groups a's and b's groups become when a gives class c1 to b and takes c2 from b."""
    # Parts 0, 1: a's side and the rest of a's group (empty unless a leaving c1 cuts a off); 2, 3 for b.
    mass, size, parent = [group_a[0], 0.0, group_b[0], 0.0], [group_a[1], 0, group_b[1], 0], [0, 0, 2, 2]
    for i, key in ((0, (a, c1)), (2, (b, c2))):
        if key in cut:
            m, s, _ = cut[key]
            mass[i], mass[i + 1], size[i], size[i + 1], parent[i + 1] = m, mass[i] - m, s, size[i] - s, i + 1

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for giver, taker, c in ((0, 2, c1), (2, 0, c2)):
        if shared[c]:  # the taker's side joins the other holders of c
            parent[find(taker)] = find(giver + 1)
        else:  # a class held by one client moves with all its samples
            mass[giver], mass[taker] = mass[giver] - n[c], mass[taker] + n[c]
    merged: dict[int, list] = {}
    for i in range(4):
        m_s = merged.setdefault(find(i), [0.0, 0])
        m_s[0], m_s[1] = m_s[0] + mass[i], m_s[1] + size[i]
    return [(m, s) for m, s in merged.values() if s > 0]
