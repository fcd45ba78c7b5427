"""What the full profile downloads on first use (CIFAR-100, DINO weights): is it here, can it be fetched?"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_FOLDER = "cifar-100-python"  # what torchvision extracts under data_root
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from the hub, in its order
PROBE_SECONDS = 3.0  # a blocked network answers no connection at all: wait this long, not the libraries' retries
OFFLINE_HINT = "To run offline use the smoke profile: FLME_PROFILE=smoke (synthetic data, tiny ViT)."


class DatasetUnavailableError(RuntimeError):
    """CIFAR-100 could not be found or downloaded."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (usually: no internet)."""


def cifar100_cached(root: str | Path) -> bool:
    """True when torchvision's extracted CIFAR-100 (train and test files) is under `root`."""
    folder = Path(root) / CIFAR_FOLDER
    return (folder / "train").is_file() and (folder / "test").is_file()


def cached_weights(model: str) -> str | None:
    """Path of the timm weights of `model` in the Hugging Face cache, or None if they were never downloaded."""
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in WEIGHT_FILES:
        path = try_to_load_from_cache(f"timm/{model}", filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def reachable(hosts: list[str], seconds: float = PROBE_SECONDS) -> dict[str, bool]:
    """Whether a TCP connection to each host's port 443 opens within `seconds` (all probed at once)."""
    found = dict.fromkeys(hosts, False)

    def probe(host: str) -> None:
        try:
            socket.create_connection((host, 443), timeout=seconds).close()
            found[host] = True
        except OSError:  # DNS failure, refused, timed out
            pass

    # Daemon threads: a DNS lookup that hangs past the deadline is abandoned, not waited for.
    threads = [threading.Thread(target=probe, args=(host,), daemon=True) for host in hosts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return dict(found)


def missing_dataset(root: str | Path) -> dict[str, str]:
    """{host: what is missing and how to get it} for CIFAR-100 under `root`; empty when it is there."""
    if cifar100_cached(root):
        return {}
    where = Path(root) / CIFAR_FOLDER
    return {
        "www.cs.toronto.edu": f"CIFAR-100 (not in {where}; download {CIFAR_URL} and extract it into "
        f"data_root={str(root)!r})"
    }


def missing_weights(model: str) -> dict[str, str]:
    """{host: what is missing and how to get it} for the timm weights of `model`; empty when they are cached."""
    if cached_weights(model) is not None:
        return {}
    return {
        "huggingface.co": f"the DINO ViT-S/16 weights (timm/{model}, not in the Hugging Face cache; on a machine "
        f"with internet run python -c \"import timm; timm.create_model('{model}', pretrained=True)\" "
        "and copy ~/.cache/huggingface here, or set HF_HOME to such a copy)"
    }


def fail_if_unreachable(missing: dict[str, str]) -> None:
    """Raise one error naming every missing download whose host does not answer (none: return at once)."""
    offline = [host for host, ok in reachable(list(missing)).items() if not ok]
    if not offline:
        return
    what = [missing[host] for host in offline]
    error = DatasetUnavailableError if "www.cs.toronto.edu" in offline else WeightsUnavailableError
    raise error(
        f"could not load {' and '.join(w.split(' (')[0] for w in what)}: cannot reach {', '.join(offline)} "
        f"(tried for {PROBE_SECONDS:g} s), and the full profile downloads them on first use (then they are cached). "
        f"Missing: {'; '.join(what)}. {OFFLINE_HINT}"
    )


def check_downloads(config: dict) -> None:
    """Before any compute: fail in seconds, with one message, when the full profile's dataset or weights are
    neither here nor downloadable."""
    missing = missing_dataset(config["data_root"]) if config["dataset"] == "cifar100" else {}
    fail_if_unreachable({**missing, **(missing_weights(config["model"]) if config["pretrained"] else {})})
