"""GPU: the pair terms (positive + 3 negative shifts), forward + backward, per backend.

reference (iddc.reference.pair_sums, B x N x M matrices) vs the authors' formulation
(iddc.reference.pair_sums_masked_gather) vs streaming (iddc.streaming.streaming_pair_sums) vs the
fused Triton kernels (iddc_kernels.triton_pair_sums) at each precision, at B = 64, D = 384,
K = 27 and N = M = 784 (28 x 28) and 3136 (56 x 56).

Each case records in ``benchmark.extra_info``: the time of one forward + backward, the achieved
rate (2 B N M (D + 3K) flop per pair set, 1 + S pair sets, S = 3) beside a plain 4096 x 4096
matmul's rate at the same precision measured in the same run, and the peak CUDA memory allocated
over the inputs by a step after the warm-up one (torch.cuda.max_memory_allocated after
reset_peak_memory_stats; the first step's autotuning allocates buffers of its own). A CUDA
out-of-memory error (expected for the reference at N = 3136) is recorded, not raised.

For the "tf32" rows the PyTorch baselines run with TF32 matmuls allowed
(torch.backends.cuda.matmul.allow_tf32), the "ieee" rows with it disallowed. The "bf16" row
feeds the fused kernels bfloat16 features and probabilities (what bf16 autocast gives), against
a bfloat16 matmul's rate. The "tf32x3" row (three TF32 tensor-core products per dot, about
float32 accuracy) is compared with the exact float32 matmul's rate: it is the rate a result of
that accuracy gets from cuBLAS.

For the autotuned (non-deterministic) Triton rows, ``extra_info`` also holds the autotuner's
choice and each candidate's median time in ms (``autotune_best``, ``autotune_ms``): the data for
pruning the candidate list.

Run with ``pytest benchmarks/test_bench_triton.py``; skipped without a CUDA device.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common import RESULTS, loss_flops, matmul_rate, record  # RESULTS: the table conftest prints

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="Triton GPU benchmarks need a CUDA device "
                                       "(torch.cuda.is_available() is False)")

B, D, K = 64, 384, 27
SHIFTS = (1, 2, 3)
T_POS, T_NEG = 0.2, 0.12
SIZES = {"N784": 784, "N3136": 3136}
# name -> (backend, precision, deterministic); "bf16": bfloat16 inputs (tensor cores)
IMPLS = {
    "reference-ieee": ("reference", "ieee", False),
    "reference-tf32": ("reference", "tf32", False),
    "authors-ieee": ("authors", "ieee", False),
    "authors-tf32": ("authors", "tf32", False),
    "streaming-ieee": ("streaming", "ieee", False),
    "streaming-tf32": ("streaming", "tf32", False),
    "triton-ieee": ("triton", "ieee", False),
    "triton-tf32": ("triton", "tf32", False),
    "triton-tf32x3": ("triton", "tf32x3", False),
    "triton-bf16": ("triton", "bf16", False),
    "triton-ieee-deterministic": ("triton", "ieee", True),
    "triton-tf32-deterministic": ("triton", "tf32", True),
}


def kernel_precision(precision: str) -> str:
    """The kernels' `precision` of a row's: "bf16" rows (bfloat16 inputs) take tf32 dots."""
    return "tf32" if precision == "bf16" else precision


def get_impl(backend: str, precision: str, deterministic: bool):
    """The pair-sums function of a backend (imported lazily: triton may be absent)."""
    if backend == "reference":
        from iddc.reference import pair_sums
        return pair_sums
    if backend == "authors":
        from iddc.reference import pair_sums_masked_gather
        return pair_sums_masked_gather
    if backend == "streaming":
        from iddc.streaming import streaming_pair_sums
        return streaming_pair_sums
    if backend == "triton":
        try:
            from iddc_kernels import triton_pair_sums
        except ImportError as err:
            pytest.skip(f"iddc_kernels (Triton) is not available: {err}")

        def run(*args, **kwargs):
            return triton_pair_sums(*args, precision=kernel_precision(precision),
                                    deterministic=deterministic, **kwargs)
        return run
    raise ValueError(backend)


def make_pair_inputs(batch, n, dim, classes, device, seed=0):
    """Unit features (a few shared directions + noise, so both thresholds are crossed) and
    probabilities of two views; p requires grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    dirs = F.normalize(torch.randn(8, dim, device=device, generator=g), dim=-1)

    def feats():
        alpha = torch.rand(batch, n, 1, device=device, generator=g) * 2
        pick = torch.randint(0, 8, (batch, n), device=device, generator=g)
        x = alpha * dirs[pick] + torch.randn(batch, n, dim, device=device, generator=g) / dim ** 0.5
        return F.normalize(x, dim=-1)

    u_a, u_b = feats(), feats()
    p_a = torch.softmax(2 * torch.randn(batch, n, classes, device=device, generator=g), -1)
    p_b = torch.softmax(2 * torch.randn(batch, n, classes, device=device, generator=g), -1)
    return u_a, u_b, p_a.requires_grad_(), p_b.requires_grad_()


def matmul_rate_at(precision: str) -> float:
    """A plain 4096 x 4096 matmul's flop/s: float32 with TF32 allowed or not, or bfloat16."""
    if precision == "bf16":
        return matmul_rate("cuda", torch.bfloat16, reps=5)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        return matmul_rate("cuda", torch.float32, reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def matmul_rates():
    rates = {p: matmul_rate_at(p) for p in ("ieee", "tf32", "bf16")}
    rates["tf32x3"] = rates["ieee"]  # the same accuracy from a plain float32 matmul
    return rates


def autotune_report() -> dict:
    """The row kernel's last autotuning: the chosen tiles and every candidate's median ms."""
    from iddc_kernels import pair_sums
    tuner = pair_sums._ROWS_KERNEL
    timings = getattr(tuner, "configs_timings", None) or {}

    def median(t):
        return float(t[0] if isinstance(t, (list, tuple)) else t)
    return dict(autotune_best=str(getattr(tuner, "best_config", None)),
                autotune_ms={str(cfg): round(median(t), 4) for cfg, t in timings.items()})


def make_step(fn, inputs, grad_out):
    u_a, u_b, p_a, p_b = inputs

    def step():
        sums, _ = fn(u_a, u_b, p_a, p_b, SHIFTS, t_pos=T_POS, t_neg=T_NEG, h="exp")
        ga, gb = torch.autograd.grad(sums, (p_a, p_b), grad_out.to(sums.dtype))
        torch.cuda.synchronize()
        return ga, gb
    return step


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size", list(SIZES))
def test_pair_sums_gpu(benchmark, matmul_rates, size, impl):
    backend, precision, deterministic = IMPLS[impl]
    n = SIZES[size]
    fn = get_impl(backend, precision, deterministic)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    label = f"gpu B{B} {size} {impl}"
    flops = loss_flops(B, n, n, D, K, SHIFTS)
    ceiling = matmul_rates[precision]
    try:
        torch.cuda.empty_cache()
        inputs = make_pair_inputs(B, n, D, K, "cuda")
        if precision == "bf16":
            inputs = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in inputs]
        grad_out = torch.randn(1 + len(SHIFTS), device="cuda")
        torch.cuda.synchronize()
        step = make_step(fn, inputs, grad_out)
        try:
            step()  # warm-up: compilation and autotuning happen here, outside the timing
            torch.cuda.synchronize()
            tuned = autotune_report() if backend == "triton" and not deterministic else {}
            # the peak of a second, tuned step: the autotuner's benchmarking allocates a
            # 256 MiB cache-flush buffer of its own in the first
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
        except torch.cuda.OutOfMemoryError as err:
            info = dict(seconds=math.nan, gflops=math.nan, matmul_gflops=ceiling / 1e9,
                        fraction_of_matmul=math.nan, oom=True, error=str(err).splitlines()[0],
                        batch=B, n=n, dim=D, classes=K, precision=precision,
                        deterministic=deterministic)
            benchmark.extra_info.update(info)
            RESULTS.append((label, info))
            step = inputs = None  # free the device memory before the next case
            torch.cuda.empty_cache()
            # pytest-benchmark wants a measured call: a no-op, flagged by extra_info["oom"]
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
            return
        benchmark.pedantic(step, rounds=5 if n <= 1000 else 3, iterations=1, warmup_rounds=1)
        record(benchmark, label, flops, ceiling, extra_peak_bytes=int(extra), oom=False,
               batch=B, n=n, dim=D, classes=K, precision=precision,
               deterministic=deterministic, device=torch.cuda.get_device_name(), **tuned)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.cuda.empty_cache()
