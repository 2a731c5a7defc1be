"""CPU: the full IDDC loss, reference vs the authors' formulation vs streaming.

Run with ``pytest benchmarks/``. Each case records in ``extra_info`` its time, its achieved rate
(2 B N M (D + 3K) flop per pair set over the measured time) beside a plain 4096 x 4096 float32
matmul's rate measured in the same run, and its peak extra memory measured in a fresh process.
"""
import pytest
import torch

from common import (full_loss_step, loss_flops, make_inputs, matmul_rate,
                    peak_extra_memory_cpu, record)
from iddc.reference import pair_sums_masked_gather

D, K = 384, 27
IMPLEMENTATIONS = {"reference": "reference", "authors": pair_sums_masked_gather,
                   "streaming": "streaming"}
# (B, side): N = side^2 = 784 at 28 x 28 (224 px at patch 8), 3136 at 56 x 56 (448 px)
SIZES = {"B8-N784": (8, 28), "B16-N784": (16, 28), "B4-N3136": (4, 56)}


@pytest.fixture(scope="module")
def cpu_matmul_rate():
    return matmul_rate("cpu", torch.float32)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("size", list(SIZES))
def test_loss_cpu(benchmark, cpu_matmul_rate, size, impl):
    batch, side = SIZES[size]
    n = side * side
    step = full_loss_step(IMPLEMENTATIONS[impl], make_inputs(batch, side, D, K))
    rounds = 3 if n > 1000 else 5
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    memory = peak_extra_memory_cpu(impl, batch, side, D, K)
    record(benchmark, f"cpu {size} {impl}", loss_flops(batch, n, n, D, K), cpu_matmul_rate,
           extra_peak_bytes=memory, threads=torch.get_num_threads())
