"""The GPU session's runbook (benchmarks/run_gpu.sh, benchmarks/warm_triton_cache.py), checked
where CI can: a GPU lease is short, so what it runs must not first fail there.

- the cache warmer launches exactly the tiles the benchmarks' autotuner will time, for every
  autotuned Triton row and size, and the deterministic rows' fixed tiles;
- its worker really launches them (here under Triton's interpreter, at tiny sizes);
- every benchmark row the script names as "core" exists.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import test_bench_triton as bench  # noqa: E402
import warm_triton_cache as warm  # noqa: E402

from iddc_kernels.pair_sums import autotune_candidates, fixed_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_warm_tasks_are_the_benchmarks_kernels():
    tasks = warm.tasks()
    got = {(impl, size, tuple(sorted(cfg.items()))) for impl, size, cfg in tasks}
    assert len(got) == len(tasks), "a kernel would be compiled twice"
    want = set()
    for impl, (backend, precision, deterministic) in bench.IMPLS.items():
        if backend != "triton":
            continue
        cfgs = [fixed_config(bench.K, precision)] if deterministic else \
            autotune_candidates(bench.K, bench.D, bench.kernel_precision(precision))
        want |= {(impl, size, tuple(sorted(c.items()))) for size in bench.SIZES for c in cfgs}
    assert got == want
    assert {impl for impl, _, _ in tasks} == {i for i, v in bench.IMPLS.items() if v[0] == "triton"}


def test_warm_shares_keep_each_tile_in_one_worker():
    tasks = warm.tasks()
    shares = warm.shares_of(tasks, 14)
    assert len(shares) == 14 and sorted(map(repr, sum(shares, []))) == sorted(map(repr, tasks))
    owner = {}
    for i, share in enumerate(shares):
        for impl, size, cfg in share:
            assert owner.setdefault((impl, repr(sorted(cfg.items()))), i) == i
    assert max(map(len, shares)) - min(map(len, shares)) <= 2  # balanced within one tile


def test_warm_worker_launches_its_tiles(monkeypatch, capsys):
    """Natively on a GPU; under the interpreter (tests/conftest.py) elsewhere."""
    # the benchmarks' rows at a size the interpreter runs in seconds
    monkeypatch.setattr(bench, "B", 4)
    monkeypatch.setattr(bench, "D", 24)
    monkeypatch.setattr(bench, "SIZES", {"N784": 20, "N3136": 33})
    chunk = [("triton-tf32", "N784", dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=32, num_warps=8,
                                          num_stages=2)),
             ("triton-bf16", "N784", dict(BLOCK_I=64, BLOCK_J=32, BLOCK_D=32, num_warps=8,
                                          num_stages=2)),
             ("triton-ieee-deterministic", "N3136",
              fixed_config(bench.K, "ieee"))]
    assert warm.work(chunk, device=DEVICE) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(": ok (" in line for line in lines), lines
    # a launch that fails is counted and named, not raised
    bad = [("triton-tf32", "N784", dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=32, BLOCK_K=7))]
    assert warm.work(bad, device=DEVICE) == 1
    assert "FAILED" in capsys.readouterr().out


def test_warm_refuses_without_a_gpu_compiler():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "warm_triton_cache.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "nothing to compile" in proc.stderr or "would not be compiled" in proc.stderr


def test_core_rows_named_by_the_script_exist():
    script = open(os.path.join(BENCH, "run_gpu.sh"), encoding="utf-8").read()
    loop = re.search(r"for id in (.*?); do", script, re.S).group(1)
    core = loop.replace("\\\n", " ").split()
    assert len(core) == 8
    ids = {f"{size}-{impl}" for size in bench.SIZES for impl in bench.IMPLS}
    assert set(core) <= ids, set(core) - ids
    # the rows issue 3's targets are measured on: triton and the reference, both sizes
    for size in bench.SIZES:
        for impl in ("triton-tf32", "reference-tf32", "triton-ieee", "reference-ieee"):
            assert f"{size}-{impl}" in core


def test_explicit_tiles_and_autotuned_ones_share_nblk(monkeypatch):
    """NBLK (an int kernel argument, specialised on divisibility by 16) must not depend on the
    tiles, or a warm launch with explicit tiles and the autotuner's launch would compile two
    kernels (e.g. N = 1024: 8 blocks of 128 rows against 64 of 16)."""
    import iddc_kernels.pair_sums as ps
    monkeypatch.setattr(ps, "_MIN_BLOCK_I", 16)  # the GPU candidates' smallest row block
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(2, 40, 8, generator=g), dim=-1)
    p = torch.randn(2, 40, 3, generator=g).softmax(-1)
    shapes = set()
    for bi in (16, 32, 64):
        cfg = dict(BLOCK_I=bi, BLOCK_J=32, BLOCK_D=16)
        psum, pcnt, _, _ = ps._launch(u, u, p, p, (1,), 0.2, 0.1, 0, "ieee", False, False,
                                      config=cfg)
        shapes.add(tuple(psum.shape))
    assert shapes == {(2, 2, 3)}  # cdiv(40, 16) blocks whatever the tiles


def test_benchmarks_run_once_untimed_with_benchmark_disable(tmp_path):
    """`pytest benchmarks/ --benchmark-disable` (a smoke test of the benchmarks) runs each case
    once, untimed: no timings are recorded, rather than every case failing on its missing
    statistics."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(BENCH, "test_bench_loss_cpu.py"), "-q",
         "-k", "B8-N784 and streaming", "--benchmark-disable", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b1 passed\b", proc.stdout)
    assert "IDDC loss: forward + backward" not in proc.stdout  # no table of untimed rows
