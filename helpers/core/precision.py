"""Mixed precision (the `amp` parameter): the one rule from (amp, device) to an autocast dtype and a GradScaler,
and the `deterministic` switches.

fp16 and bf16 also run on the CPU (torch.autocast("cpu"), torch.amp.GradScaler("cpu")), so the T4's fp16 path
(loss scaling, skipped steps on inf/NaN, scaler state in checkpoints and between FedAvg clients) runs in the tests.
"""

from __future__ import annotations

import os
import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

AMP_CHOICES = ("auto", "fp16", "bf16", "fp32")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
CUBLAS_WORKSPACE = ":4096:8"  # one of the two settings that make cuBLAS deterministic (CUDA docs)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision `amp` means on `device`: fp16, bf16 or fp32 (auto: fp16 below sm_80, bf16 from it, CPU fp32)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp={amp!r} is invalid: must be one of {', '.join(AMP_CHOICES)}")
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "fp32"
    # T4 (sm_75) reports bf16 support but emulates it slowly: bf16 needs compute capability 8.0+.
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `amp` on `device`, None for fp32 (no autocast)."""
    return DTYPES[resolve_amp(amp, device)]


def autocast(device: torch.device, amp: str = "auto") -> AbstractContextManager:
    """torch.autocast in `amp`'s dtype on `device`, or nothing for fp32."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_scaler(device: torch.device, amp: str = "auto") -> torch.amp.GradScaler | None:
    """A GradScaler on `device` when `amp` trains in fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if resolve_amp(amp, device) == "fp16" else None


def use_deterministic(enabled: bool) -> None:
    """Deterministic kernels on or off for the whole process (torch's switches are global, so they stay after a run).

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle, i.e. before the first matrix product on CUDA:
    it is set here if unset, with a warning if CUDA is already in use (set it before starting Python then).
    """
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if not enabled:
        return
    torch.backends.cudnn.benchmark = False  # autotuning may pick a different kernel in each process
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn(
                "deterministic=true: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set, so cuBLAS may "
                f"stay non-deterministic in this process; export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} first",
                stacklevel=2,
            )
