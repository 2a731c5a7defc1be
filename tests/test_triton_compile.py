"""The Triton kernels compile for an H100 (sm_90a), checked on any machine.

The interpreter tests (test_triton_pair_sums.py) check what the kernels compute; compiling for
the real target checks what the interpreter cannot (types in every constexpr branch, ops the
backend supports). Runs tests/compile_for_hopper.py in a subprocess with the interpreter off.
Register use and spills are printed for the record (-s), not asserted: speed is measured by
the GPU benchmarks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

HERE = os.path.dirname(os.path.abspath(__file__))


def _ptxas_available() -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(),
                    reason="this triton build has no CUDA backend (ptxas) to compile with")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_for_hopper.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_pair_sums_rows_kernel", "_pair_sums_cols_grad_kernel"}
    assert len(rows) == 13
    failed = [f"{r['kernel']} {r['variant']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    # int64 offsets: no stride (an i32 argument below 2**31) meets a 32-bit index
    wraps = [f"{r['kernel']} {r['variant']}: {line}" for r in rows
             for line in r["int32_stride_products"]]
    assert not wraps, "\n".join(wraps)
    for r in rows:
        assert r["registers"] > 0
        print(f"{r['kernel']:30s} {r['variant']:40s} {r['registers']:4d} registers, "
              f"{r['spill_bytes']} spill bytes")
