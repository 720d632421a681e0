"""The machine's dense limit, which the benchmarks set their models' FLOP rates against."""

from __future__ import annotations

import time

import torch


def matmul_gflops(m: int, k: int, n: int, device: str = "cpu", seconds: float = 2.0) -> float:
    """float32 GFLOP/s of ``[m, k] x [k, n]`` on ``device``, over about ``seconds``.

    On a GPU the products go in groups of 10 between synchronisations (the launches
    overlap, as they do in training)."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    a @ b
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    group = 10 if device == "cuda" else 1
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(group):
            a @ b
        sync()
        done += group
    return done * 2 * m * k * n / (time.perf_counter() - start) / 1e9
