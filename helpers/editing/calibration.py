"""Mask calibration for model editing (§9) and the masks' storage in the run folder.

Scores and the multi-round rule are helpers.sparse.sensitivity's (calibrate_masks); this module feeds it: a Scorer sums
compute_scores over the train split (centralized) or over each client's shard (federated: the server's sum of
client scores, or per-client masks with mask_scope="local"). Masks are saved packed with the step-0 head in the run
folder (EDITING_FILE), so a resumed run never recalibrates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from helpers.config.experiments import setting
from helpers.core.models import backbone_parameters
from helpers.core.seeding import derive_seed, torch_generator
from helpers.data.datasets import Data, augment_batch, eval_batch
from helpers.federated.clients import BYTES_PER_ENTRY
from helpers.federated.remote import RemoteClients
from helpers.sparse.masks import Masks, TensorMasks
from helpers.sparse.sensitivity import calibrate_masks, compute_scores
from helpers.training.resumable import interactive
from helpers.training.runs import Run, load_artifact

EDITING_FILE = "editing.pt"  # step-0 head, packed masks and calibration cost, in the run folder


def calibration_batches(data: Data, pool: Tensor, key: tuple, call: int, config: dict) -> tuple[list, int]:
    """A pool's calibration batches (a seeded subset without replacement, the same in every round) and its size."""
    size, dev = config["batch_size"], data.train_x.device
    order = torch.randperm(len(pool), generator=torch_generator(config["seed"], "calibration", *key))
    chosen = pool[order][: config["calibration_samples"]]
    augment = setting(config, "score_transform") == "train"  # TaLoS scores augmented images
    gen = torch_generator(config["seed"], "calibration_augment", call, *key)
    img_size, mode = config["img_size"], config["augment"]

    def batches():
        for idx in chosen.split(size):
            idx = idx.to(dev)
            x = data.train_x[idx]
            x = augment_batch(x, gen, img_size=img_size, mode=mode) if augment else eval_batch(x, img_size=img_size)
            yield x, data.train_y[idx]

    return batches(), len(chosen)


def score_pool(
    model: nn.Module, data: Data, pool: Tensor, key: tuple, call: int, config: dict
) -> tuple[dict[str, Tensor], int]:
    """One pool's (one client's) summed scores in calibration round `call` and the samples it scored; where the
    data is (helpers.flower.node runs it on a client's node). Every round draws fresh labels."""
    batches, samples = calibration_batches(data, pool, key, call, config)
    gen = torch_generator(config["seed"], "talos_labels", call, *key)
    return compute_scores(model, batches, method=config["score_method"], generator=gen), samples


class Scorer:
    """score_fn for calibrate_masks: the sum over `pools` (the train split, or each client's shard) of
    compute_scores on calibration_samples samples of that pool (all of it if smaller), eval preprocessing
    (or, score_transform="train", augmented as in training: seeded by round and pool).

    Each pool is scored on its own (score_pool: here, or by `remote` on the clients), then the sums are added in
    pool order: the server's sum of client scores. Counts the cost: samples scored and score tensors uploaded.
    """

    def __init__(
        self,
        data: Data,
        pools: list,
        keys: list[tuple],
        config: dict,
        progress: bool = False,
        remote: RemoteClients | None = None,
    ):
        self.data, self.pools, self.keys, self.config, self.progress = data, pools, keys, config, progress
        self.remote = remote  # keys are ("client", k): client k scores its own shard
        self.calls = self.samples = self.uploads = 0

    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        self.calls += 1
        if self.remote is not None:
            results = self.remote.client_scores(model, self.config, self.calls, [k for _, k in self.keys])
        else:
            results = (score_pool(model, self.data, pool, key, self.calls, self.config)
                       for pool, key in zip(self.pools, self.keys, strict=True))  # fmt: skip
        bar = tqdm(results, total=len(self.keys), desc=f"scoring (round {self.calls})", leave=False,
                   disable=not (self.progress and interactive()) or len(self.keys) < 2)  # fmt: skip
        total = None
        for scores, samples in bar:
            self.samples += samples
            self.uploads += 1
            total = scores if total is None else {n: total[n].add_(s) for n, s in scores.items()}
        return total


TOKEN_EMBEDDINGS = ("cls_token", "reg_token", "pos_embed")  # parameters of the ViT itself, not of a layer


def masked_names(model: nn.Module, config: dict) -> list[str]:
    """The backbone parameters under the mask: all of them, or (embeddings="dense", as in the TaLoS reference)
    all but the token embeddings, which then train densely."""
    dense = TOKEN_EMBEDDINGS if config["embeddings"] == "dense" else ()
    return [n for n in backbone_parameters(model) if n not in dense]


def check_masks(model: nn.Module, masks: Mapping[str, Tensor], config: dict) -> None:
    """Masks must cover exactly the masked parameters: one left out would silently train densely."""
    want = masked_names(model, config)
    missing, extra = [n for n in want if n not in masks], sorted(set(masks) - set(want))
    if missing or extra:
        raise ValueError(
            f"masks do not match the masked parameters (embeddings={config['embeddings']!r}): "
            + (f"no mask for {missing[:5]} ({len(missing)} in all), which would train densely; " if missing else "")
            + (f"masks for {extra[:5]}, which are not masked parameters; " if extra else "")
            + "recalibrate: delete the run folder"
        )


def calibrate(model: nn.Module, scorer: Scorer, config: dict, seed: int | None = None) -> TensorMasks:
    """calibrate_masks with the config's sparsity, rounds, rule and masked parameters (one-shot rules and
    sparsity 0 never call the scorer)."""
    return calibrate_masks(
        model, scorer, sparsity=config["sparsity"], rounds=config["calibration_rounds"], rule=config["mask_rule"],
        seed=config["seed"] if seed is None else seed, names=masked_names(model, config),
    )  # fmt: skip


def calibrate_centralized(model: nn.Module, data: Data, config: dict, progress: bool = False) -> tuple[Masks, dict]:
    """Masks from scores on calibration_samples samples of the train split; returns (masks, cost)."""
    t0 = time.perf_counter()
    scorer = Scorer(data, [torch.arange(len(data.train_y))], [("train",)], config, progress)
    masks = Masks(shared=calibrate(model, scorer, config))
    return masks, {"calibration_s": round(time.perf_counter() - t0, 3), "calibration_scored": scorer.samples}


def calibrate_federated(
    model: nn.Module,
    data: Data,
    shards: list,
    config: dict,
    progress: bool = False,
    remote: RemoteClients | None = None,
) -> tuple[Masks, dict]:
    """Global scope: one mask from the sum of every client's scores. Local: each client's own mask.

    `remote`: the clients score their own shards (federated.remote). Returns (masks, cost); cost counts the score
    tensors clients upload (none for local masks, counted as a client calibrating its own mask; on Flower the
    server computes it from the client's scores, which do travel).
    """
    t0 = time.perf_counter()
    keys = [("client", k) for k in range(len(shards))]
    if config["mask_scope"] == "global":
        scorers = [Scorer(data, shards, keys, config, progress, remote)]
        masks = Masks(shared=calibrate(model, scorers[0], config))
    else:
        scorers = [Scorer(data, [shard], [key], config, remote=remote) for shard, key in zip(shards, keys, strict=True)]
        bar = tqdm(scorers, desc="local masks", leave=False, disable=not (progress and interactive()))
        own = [calibrate(model, sc, config, seed=derive_seed(config["seed"], *sc.keys[0])) for sc in bar]
        masks = Masks.per_client(own)
    entries = sum(p.numel() for p in backbone_parameters(model).values())
    uploads = sum(sc.uploads for sc in scorers) if config["mask_scope"] == "global" else 0
    cost = {
        "calibration_s": round(time.perf_counter() - t0, 3),
        "calibration_scored": sum(sc.samples for sc in scorers),
        "calibration_upload_bytes": BYTES_PER_ENTRY * entries * uploads,
    }
    return masks, cost


def load_masks(run: Run, device: str | torch.device = "cpu") -> Masks:
    """The masks a sparse run trained with."""
    saved = load_artifact(run, EDITING_FILE)
    if not isinstance(saved, dict) or "masks" not in saved:
        raise ValueError(
            f"run {run.dir} has no readable {EDITING_FILE}: it is not a sparse run, it has not calibrated yet, or "
            "the file is damaged (then starting the run again calibrates anew)"
        )
    return Masks.unpack(saved["masks"], device)


def load_run_masks(model: nn.Module, stored: dict | list, config: dict, device: torch.device) -> Masks:
    """A sparse run's saved masks, checked against the model (every client's, for per-client masks)."""
    masks = Masks.unpack(stored, device)
    for mask in masks.packed_clients or [masks.shared]:
        check_masks(model, mask, config)  # names only: a packed mask has the same keys as the mask
    return masks
