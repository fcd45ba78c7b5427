"""Timing for the benchmarks: wall time with the GPU's queue drained, the best of a few calls, and the device's
half-precision peak for model FLOP utilisation."""

from __future__ import annotations

import time

import torch

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) from vendor datasheets, used for model FLOP utilisation.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense half-precision peak in FLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def clock(fn, device: torch.device) -> float:
    """Wall time of one call, with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls after one warm-up (best = least disturbed by other processes)."""
    fn()
    return min(clock(fn, device) for _ in range(repeats))
