"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1): local steps corrected by c - c_i, control variates for drift.

Client i, from the global w with K local steps at lr eta: g <- g + c - c_i at every step; then option II (default)
c_i+ = c_i - c + (w - y_i) / (K_eff eta), or option I c_i+ = the loss gradient at w (here: on its first applied
batch, no extra pass); it sends y_i and Delta c_i = c_i+ - c_i. Server: w as in FedAvg (global step size = server_lr,
the clients' size-weighted average: equal to the paper's plain mean for equal shards), c <- c + (1/N) sum_S Delta c_i.

K_eff = sum_{k=1..K} (1 - beta^k) / (1 - beta) is the effective number of steps of the clients' heavy-ball SGD
(momentum beta, torch's form: no dampening): its K steps move w - y_i = eta sum_k w_k (g_k + lambda y_k + c - c_i),
w_k = (1 - beta^(K-k+1)) / (1 - beta), sum_k w_k = K_eff. Dividing by K_eff eta (the paper's K eta at beta = 0)
makes c_i+ the w_k-weighted mean of the gradients of the weight-decayed objective and cancels c - c_i exactly; the
paper's K eta would feed back -(K_eff / K - 1) (c - c_i), which diverges once K_eff > 2K (K >= 4 at beta = 0.9).
K counts the applied steps (a straggler's; a step a GradScaler skips moves nothing). Why this and not the mean of
the gradients or plain SGD clients: docs/remedies.md.
Under a mask every c_i is 0 at its frozen entries and stored only at its trainable ones (one file per client and
round in the run folder, fp32: the paper's math unchanged), so RAM holds c and one client's c_i at a time.
On Flower (engine="flower") c stays on the ServerApp and each c_i on its client's node (to_node, from_server).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from helpers.algorithms.fedavg import SERVER_LR, ClientSide, FedAvg
from helpers.core.params import choice
from helpers.core.storage import remove_file
from helpers.core.torchfiles import UnreadableFile, load_torch, save_torch

VERSION_FILE = re.compile(r"(\d+)_(\d+)\.pt")  # <client>_<rounds done>.pt


def pack_entries(tensors: list[Tensor], masks: Sequence[Tensor | None]) -> list[Tensor]:
    """Each tensor's entries where its mask is True (all of them without a mask), flat, on the CPU."""
    return [(t[m] if m is not None else t.flatten()).cpu() for t, m in zip(tensors, masks, strict=True)]


def unpack_entries(values: list[Tensor], masks: Sequence[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    """The inverse of pack_entries: tensors shaped like `like`, zero where a mask is False."""
    out = [torch.zeros_like(t) for t in like]
    for o, v, m in zip(out, values, masks, strict=True):
        if m is not None:
            o[m] = v.to(o.device)
        else:
            o.copy_(v.view(o.shape))
    return out


class ControlVariates:
    """Every client's c_i (packed), versioned by the rounds done when it was written, so a run resumed from an
    earlier checkpoint reads the versions of that round. In memory, or one file per version under `folder`, written
    and removed like every run-folder file: after `guard()` (the run's lease check), atomically, with retries; and
    loaded without executing code. A version's content is a pure function of (client, round), so a late write by a
    session that lost the run rewrites the same numbers; a version it removed that a checkpoint needs is an error
    naming the file, never a silent c_i = 0."""

    def __init__(self, folder: str | Path | None = None, guard: Callable[[], None] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.guard = guard or (lambda: None)
        self.versions: dict[int, dict[int, list[Tensor] | None]] | None = None  # client -> {rounds done: values}
        self.expected: dict[int, int] = {}  # client -> the version the resumed checkpoint needs

    def index(self) -> dict[int, dict[int, list[Tensor] | None]]:
        if self.versions is None:  # files are read when needed (None); the folder is listed once per run
            self.versions = {}
            for path in self.folder.glob("*.pt") if self.folder is not None else ():
                if match := VERSION_FILE.fullmatch(path.name):
                    self.versions.setdefault(int(match[1]), {})[int(match[2])] = None
        return self.versions

    def path(self, client: int, done: int) -> Path:
        return self.folder / f"{client}_{done}.pt"

    def load(self, client: int, upto: int) -> list[Tensor] | None:
        """Client's latest c_i written after at most `upto` rounds (None: never written, c_i = 0)."""
        done = max((d for d in self.index().get(client, {}) if d <= upto), default=None)
        want = self.expected.get(client)
        if want is not None and want <= upto and (done is None or done < want):
            raise RuntimeError(
                f"{self.path(client, want)} is missing, and the checkpoint this run resumed from needs it (removed "
                f"by a session that lost the run?): run it again later to resume from the newest checkpoint, or "
                f"delete {self.folder.parent} to restart it"
            )
        if done is None:
            return None
        values = self.versions[client][done]
        return values if values is not None else self.read(self.path(client, done))

    def read(self, path: Path) -> list[Tensor]:
        """A stored version: a list of tensors, else an error naming the file (never unpickled as code)."""
        try:
            values = load_torch(path)
        except UnreadableFile as exc:
            raise RuntimeError(f"SCAFFOLD's control variate: {exc}; delete {self.folder.parent} to restart") from None
        if not isinstance(values, list) or not all(isinstance(v, Tensor) for v in values):
            raise RuntimeError(f"{path} is not a control variate (a list of tensors); delete {self.folder.parent}")
        return values

    def save(self, client: int, done: int, values: list[Tensor], keep: int) -> None:
        """Store c_i after `done` rounds; drop the versions older than the latest one at most `keep` rounds old
        (the one a resume from the oldest checkpoint kept on disk reads)."""
        versions = self.index().setdefault(client, {})
        if self.folder is None:
            versions[done] = values
        else:
            self.guard()
            self.folder.mkdir(parents=True, exist_ok=True)
            save_torch(self.path(client, done), values)  # a kill leaves the old version or the new one
            versions[done] = None
        oldest_needed = max((d for d in versions if d <= keep), default=None)
        for d in [d for d in versions if oldest_needed is not None and d < oldest_needed]:
            del versions[d]
            self.remove(client, d)

    def remove(self, client: int, done: int) -> None:
        if self.folder is not None:
            self.guard()
            remove_file(self.path(client, done))

    def clear(self) -> None:
        """Forget every version (a done run never resumes): frees the run folder's share of the disk."""
        for client, versions in self.index().items():
            for done in list(versions):
                self.remove(client, done)
        self.versions = {}

    def latest(self, upto: int) -> dict[int, int]:
        """client -> its newest version written after at most `upto` rounds (what a checkpoint then needs)."""
        found = {c: max((d for d in v if d <= upto), default=None) for c, v in self.index().items()}
        return {c: d for c, d in found.items() if d is not None}

    def expect(self, versions: Mapping[int, int]) -> None:
        """The versions a resumed checkpoint needs (latest): their absence is an error, not c_i = 0."""
        self.expected = {int(c): int(d) for c, d in versions.items()}

    def nbytes(self) -> int:
        """Bytes the current versions take (one per client)."""
        total = 0
        for client in self.index():
            values = self.load(client, max(self.versions[client]))
            total += sum(v.numel() * v.element_size() for v in values)
        return total


def effective_steps(steps: int, momentum: float) -> float:
    """K_eff = sum_{k=1..K} (1 - beta^k) / (1 - beta): w - y_i over eta for a constant unit gradient (K at beta 0)."""
    return sum((1 - momentum**k) / (1 - momentum) for k in range(1, steps + 1))


class ControlledSteps(ClientSide):
    """Client i's corrected steps and its new control variate."""

    def __init__(self, scaffold: Scaffold, rnd: int, client: int, start: list[Tensor], masks, lr: float) -> None:
        self.scaffold, self.rnd, self.client, self.start, self.masks = scaffold, rnd, client, start, masks
        self.lr = lr
        packed = scaffold.store.load(client, upto=rnd)
        self.c_i = unpack_entries(packed, masks, start) if packed is not None else [torch.zeros_like(w) for w in start]
        self.correction = torch._foreach_sub(scaffold.c, self.c_i)  # c - c_i
        self.first_grad: list[Tensor] | None = None
        self.taken = torch.zeros((), dtype=torch.int64, device=start[0].device)  # applied steps (no sync per step)

    @torch.no_grad()
    def correct(self, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        # A GradScaler skips a step whose gradients are not finite: the weights and momentum do not move.
        finite = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
        if self.scaffold.option == "I":  # the loss gradient at w: of the first applied step (a skipped one left w)
            first = self.first_grad or [torch.zeros_like(g) for g in grads]
            self.first_grad = [torch.where(finite & (self.taken == 0), g, f) for g, f in zip(grads, first, strict=True)]
        self.taken += finite
        torch._foreach_add_(grads, self.correction)

    @torch.no_grad()
    def finish(self, params: list[Tensor]) -> list[Tensor]:
        taken = int(self.taken)  # one sync per client
        if not taken:  # every step skipped: nothing measured, c_i stays
            new = self.c_i
        elif self.scaffold.option == "I":
            new = self.first_grad
        else:  # c_i - c + (w - y_i) / (K_eff eta)
            new = torch._foreach_sub(self.start, params)
            torch._foreach_div_(new, effective_steps(taken, self.scaffold.momentum) * self.lr)
            torch._foreach_sub_(new, self.correction)
        new = [n.masked_fill(~m, 0) if m is not None else n for n, m in zip(new, self.masks, strict=True)]
        self.scaffold.store.save(
            self.client, self.rnd + 1, pack_entries(new, self.masks), keep=self.scaffold.kept_round()
        )
        return torch._foreach_sub(new, self.c_i)  # Delta c_i


class Scaffold(FedAvg):
    """SCAFFOLD: FedAvg's server step for w, plus the server control variate c (dense over trainable tensors)."""

    name = "scaffold"
    params = {
        "server_lr": replace(SERVER_LR, source="Karimireddy et al. 2020 (ICML), Sec. 7: global step size 1"),
        "scaffold_option": choice(
            "II",
            "I",
            meaning="SCAFFOLD's control-variate update: II (from the client's steps) or I (a gradient at "
            "the global weights)",
            default="II",
            source="Karimireddy et al. 2020, Algorithm 1: option II, the cheaper",
        ),
    }
    tuning = ("server_lr", (0.5, 1.0, 2.0))  # the global step size eta_g around the paper's 1
    upload_factor = 2  # y_i and Delta c_i
    stateful = True
    node_state = True  # c_i: on Flower, in the node's state-dir (helpers.flower.node.node_state_dir)
    memory_copies = 4  # c, the round's sum of Delta c_i, and the training client's c_i and correction

    def __init__(self, config: Mapping, store: ControlVariates | None = None) -> None:
        super().__init__(config)
        self.option, self.num_clients = config["scaffold_option"], config["num_clients"]
        self.momentum = config["momentum"]  # the clients' (helpers.fedavg.client_optimizer): K_eff
        self.store = store if store is not None else ControlVariates()
        self.c: list[Tensor] | None = None
        self.delta_c: list[Tensor] | None = None  # the round's sum of Delta c_i
        self.done = 0  # rounds done
        self.checkpoints: list[int] = []  # rounds done at the last two state_dict calls (checkpoints)
        self.keep: int | None = None  # a Flower node's copy: the server's kept_round for this round

    @classmethod
    def from_config(
        cls, config: Mapping, folder: Path | None = None, guard: Callable[[], None] | None = None
    ) -> Scaffold:
        """c_i live in the run folder (one file per client and version, written after `guard()`), or in memory."""
        return cls(config, ControlVariates(Path(folder) / "control_variates" if folder is not None else None, guard))

    def client_side(
        self, rnd: int, client: int, start: list[Tensor], masks: Sequence[Tensor | None], lr: float, steps: int
    ) -> ClientSide:
        if self.c is None:
            self.c = [torch.zeros_like(w) for w in start]
        return ControlledSteps(self, rnd, client, start, masks, lr)  # K: the steps it applies, counted

    def to_node(self, start: list[Tensor], masks: Sequence[Tensor | None]) -> tuple[list[Tensor], dict[str, int]]:
        """c at the client's trainable entries (the others never reach its weights or its c_i) and the round whose
        versions of c_i its node keeps."""
        if self.c is None:
            self.c = [torch.zeros_like(w) for w in start]
        return pack_entries(self.c, masks), {"keep": self.kept_round()}

    def from_server(
        self, tensors: list[Tensor], numbers: Mapping[str, int], start: list[Tensor], masks: Sequence[Tensor | None],
        folder: Path,
    ) -> None:  # fmt: skip
        self.c, self.keep = unpack_entries(tensors, masks, start), int(numbers["keep"])
        self.store = ControlVariates(folder)

    def receive(self, client: int, extra: object | None) -> None:
        if self.delta_c is None:
            self.delta_c = extra
        else:
            torch._foreach_add_(self.delta_c, extra)

    @torch.no_grad()
    def server_step(self, start: list[Tensor], avg: list[Tensor]) -> None:
        super().server_step(start, avg)
        torch._foreach_add_(self.c, self.delta_c, alpha=1 / self.num_clients)
        self.delta_c, self.done = None, self.done + 1

    def close(self) -> None:
        self.store.clear()

    def kept_round(self) -> int:
        """Rounds done at the older of the last two checkpoints (a corrupt checkpoint falls back to it)."""
        if self.keep is not None:
            return self.keep
        return self.checkpoints[0] if len(self.checkpoints) == 2 else 0

    def state_dict(self) -> dict:
        self.checkpoints = [*self.checkpoints, self.done][-2:]
        return {"c": self.c, "done": self.done, "versions": self.store.latest(self.done)}

    def load_state_dict(self, state: dict) -> None:
        self.c, self.done, self.checkpoints = state["c"], state["done"], []
        self.store.expect(state.get("versions", {}))  # checkpoints from before versions were recorded: none
