"""Compile, in parallel processes, every Triton kernel the GPU benchmarks will launch.

Triton's autotuner compiles its candidates one after another inside the timed script (about
2 s a variant on one CPU core; the benchmarks' 4 autotuned rows x 14 candidates, shared by
their two sizes, would take about two minutes of a short GPU lease). Each worker here launches
its share of (benchmark row, tile) once at each benchmark size, on the benchmark's own shapes
with the tiles given explicitly, so the kernels land in Triton's on-disk cache with the very
specialisation the autotuner will ask for; the autotuner then finds them compiled. The runs
also check, natively, that every candidate launches at the benchmark's sizes.

Usage (from the repository root, on a CUDA machine):
    python benchmarks/warm_triton_cache.py [--workers N]
Prints one line per launch and a summary; exits 1 if any launch failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def tasks() -> list:
    """(impl, size, launch config) of every kernel the benchmark rows compile."""
    from test_bench_triton import D, IMPLS, K, SIZES, kernel_precision

    from iddc_kernels.pair_sums import autotune_candidates, fixed_config

    out = []
    for impl, (backend, precision, deterministic) in IMPLS.items():
        if backend != "triton":
            continue
        if deterministic:  # fixed tiles: the row and the transposed kernels
            configs = [fixed_config(K, precision)]
        else:
            configs = autotune_candidates(K, D, kernel_precision(precision))
        for size in SIZES:
            out += [(impl, size, cfg) for cfg in configs]
    return out


def shares_of(all_tasks: list, workers: int) -> list:
    """The tasks cut into `workers` shares, each (row, tile) in one share with its sizes one
    after the other: the benchmark's two sizes have the same specialisation (every size and
    stride divisible by 16), so the second launch is a cache hit rather than a concurrent
    compile of the same binary in another worker."""
    groups: dict = {}
    for task in all_tasks:
        groups.setdefault((task[0], json.dumps(task[2], sort_keys=True)), []).append(task)
    shares = [[] for _ in range(max(1, workers))]
    for i, group in enumerate(groups.values()):
        shares[i % len(shares)] += group
    return shares


def work(chunk: list, device: str = "cuda") -> int:
    """Launch each task once (forward with gradients: the benchmarks' kernels); the number
    that failed."""
    import torch
    from test_bench_triton import IMPLS, SHIFTS, SIZES, T_NEG, T_POS, B, D, K, make_pair_inputs

    from iddc_kernels import triton_pair_sums

    inputs, failed = {}, 0
    for impl, size, cfg in chunk:
        _, precision, deterministic = IMPLS[impl]
        bf16 = precision == "bf16"
        key = (size, bf16)
        if key not in inputs:  # at most 4 sets, about 1 GB at N = 3136
            ts = make_pair_inputs(B, SIZES[size], D, K, device)
            if bf16:
                ts = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in ts]
            inputs[key] = ts
        u_a, u_b, p_a, p_b = inputs[key]
        t0 = time.perf_counter()
        try:
            triton_pair_sums(u_a, u_b, p_a, p_b, SHIFTS, t_pos=T_POS, t_neg=T_NEG, h="exp",
                             precision="tf32" if bf16 else precision,
                             deterministic=deterministic, _config=cfg)
            if device != "cpu":
                torch.cuda.synchronize()
            status = "ok"
        except Exception as err:  # reported per tile; the summary counts them
            status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            failed += 1
        print(f"{impl} {size} {cfg}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--chunk", help=argparse.SUPPRESS)  # a worker's share, as JSON
    args = ap.parse_args(argv)
    if args.chunk is not None:
        return 1 if work(json.loads(args.chunk)) else 0
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compile", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: kernels would not be compiled", file=sys.stderr)
        return 2
    all_tasks = tasks()
    shares = shares_of(all_tasks, args.workers)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--chunk", json.dumps(share)])
             for share in shares if share]
    codes = [p.wait() for p in procs]
    bad = sum(c != 0 for c in codes)
    print(f"warm_triton_cache: {len(all_tasks)} launches in {len(procs)} processes, "
          f"{time.perf_counter() - t0:.1f} s; {bad} process(es) reported failures", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
