"""What every benchmark shares: inputs, the flop count, the matmul ceiling, the results table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from iddc import IDDCLoss

SHIFTS = (1, 2, 3)
#: (label, result dict) of every benchmark in this run, printed as a table at the end
RESULTS: list = []


def loss_flops(batch: int, n: int, m: int, dim: int, classes: int, shifts=SHIFTS) -> int:
    """Matrix work of the loss: 2 B N M (D + 3K) per pair set (features, probabilities and the
    two gradient products), for the positive set and each negative shift (there M = N)."""
    pos = 2 * batch * n * m * (dim + 3 * classes)
    return pos + len(shifts) * 2 * batch * n * n * (dim + 3 * classes)


def make_inputs(batch, side, dim, classes, device="cpu", dtype=torch.float32, seed=0):
    """Feature maps and logits of two views, with positives and negatives both selected."""
    gen = torch.Generator().manual_seed(seed)
    # a direction per image, shared by its two views (as overlapping crops share content),
    # spreads the affinities across both thresholds: pairs of one image's views are mostly
    # positives, pairs across images mostly negatives
    shared = torch.randn(batch, dim, 1, 1, generator=gen)

    def feats():
        return torch.randn(batch, dim, side, side, generator=gen) * 0.1 + shared * 0.05 \
            + torch.randn(batch, dim, 1, 1, generator=gen) * 0.02
    fa, fb = feats(), feats()
    za = torch.randn(batch, classes, side, side, generator=gen)
    zb = torch.randn(batch, classes, side, side, generator=gen)
    return [t.to(device, dtype).requires_grad_(t is za or t is zb) for t in (fa, fb, za, zb)]


def full_loss_step(backend, inputs, **loss_kwargs):
    """One forward + backward of the full loss (positive, 3 negatives, Weibull)."""
    loss_fn = IDDCLoss.from_preset("cocostuff27-vits8", backend=backend, check_finite=False,
                                   **loss_kwargs)
    fa, fb, za, zb = inputs

    def step():
        za.grad = zb.grad = None
        loss_fn(fa, fb, za, zb, shifts=SHIFTS).loss.backward()
    return step


def matmul_rate(device="cpu", dtype=torch.float32, size=4096, reps=3) -> float:
    """Achieved flop/s of a plain size x size matmul: the machine's ceiling for this work."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def peak_extra_memory_cpu(backend: str, batch: int, side: int, dim: int, classes: int) -> int:
    """Peak resident memory one loss step adds over its inputs, measured in a fresh process."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "peak_memory.py"), backend, str(batch), str(side),
           str(dim), str(classes)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


def record(benchmark, label: str, flops: int, ceiling: float, **extra):
    """Attach time, rate and memory to the benchmark's extra_info and the summary table; None,
    recording nothing, under ``--benchmark-disable`` (each case then runs once, untimed: a
    smoke test)."""
    if benchmark.stats is None:
        return None
    seconds = benchmark.stats.stats.min
    info = dict(seconds=seconds, gflops=flops / seconds / 1e9, matmul_gflops=ceiling / 1e9,
                fraction_of_matmul=flops / seconds / ceiling, **extra)
    benchmark.extra_info.update(info)
    RESULTS.append((label, info))
    return info
