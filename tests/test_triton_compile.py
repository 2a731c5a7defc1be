"""The Triton kernels compile for an H100 (sm_90a), checked on any machine.

The interpreter tests (test_triton_pair_sums.py) check what the kernels compute; compiling for
the real target checks what the interpreter cannot (types in every constexpr branch, ops the
backend supports, 32-bit offsets). Runs tests/compile_for_hopper.py in a subprocess with the
interpreter off: each variant compiled as the JIT specialises it for a contiguous call (the
ptxas figures) and unspecialised (the int32 scan). Register use and spills are printed for the
record (-s), not asserted: speed is measured by the GPU benchmarks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "compile_for_hopper.py")
#: strides of a tensor's last dimension (u: D; p and the gradients: K). The launcher keeps
#: stride(-1) * (size(-1) - 1) below 2**31, so a 32-bit product of one of them with a lane
#: index (at most D-1 or K-1) cannot wrap; a product by any other stride can
LAST_DIM_STRIDE = re.compile(r"s_\w*[dk]")


def _ptxas_available() -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "ptxas"))


def _script():
    spec = importlib.util.spec_from_file_location("compile_for_hopper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int32_scan_traces_strides_through_shape_ops():
    """A stride splat (and broadcast) to a tensor before the multiply is found, as is a scalar
    one; 64-bit products and products of no stride are not."""
    ttir = """module {
  tt.func public @k(%x_ptr: !tt.ptr<f32>, %n: i32, %s_xn: i32 loc("s_xn"(#loc)), %s_xd: i32) {
    %offs = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc1)
    %a = tt.expand_dims %offs {axis = 0 : i32} : tensor<64xi32> -> tensor<1x64xi32> loc(#loc2)
    %b = tt.splat %s_xd : i32 -> tensor<1x64xi32> loc(#loc3)
    %c = arith.muli %a, %b : tensor<1x64xi32> loc(#loc3)
    %d = tt.broadcast %b : tensor<1x64xi32> -> tensor<32x64xi32> loc(#loc4)
    %e = tt.broadcast %a : tensor<1x64xi32> -> tensor<32x64xi32> loc(#loc4)
    %f = arith.muli %e, %d : tensor<32x64xi32> loc(#loc4)
    %w = arith.extsi %s_xn : i32 to i64 loc(#loc5)
    %g = arith.muli %w, %w : i64 loc(#loc5)
    %h = arith.muli %n, %s_xn : i32 loc(#loc6)
    %i = arith.muli %n, %n : i32 loc(#loc7)
    %j = arith.muli %offs, %offs : tensor<64xi32> loc(#loc8)
    tt.return loc(#loc9)
  } loc(#loc)
} loc(#loc)
"""
    found = _script().int32_stride_products(ttir, "k", ["x_ptr", "n", "s_xn", "s_xd"])
    assert [(p["stride"], p["op"].split(" =")[0]) for p in found] == \
        [("s_xd", "%c"), ("s_xd", "%f"), ("s_xn", "%h")]
    with pytest.raises(ValueError, match="not an unspecialised compile"):
        _script().int32_stride_products(ttir, "k", ["x_ptr", "n", "s_xn"])


@pytest.mark.skipif(not _ptxas_available(),
                    reason="this triton build has no CUDA backend (ptxas) to compile with")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_pair_sums_rows_kernel", "_pair_sums_cols_grad_kernel"}
    assert len(rows) == 15
    failed = [f"{r['kernel']} {r['variant']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    # the JIT's specialisation, emulated by the script, agrees with the installed Triton's own
    differ = [f"{r['variant']}: {m}" for r in rows for m in (r["jit_rule_mismatches"] or [])]
    assert not differ, "\n".join(differ)
    # int64 offsets: a stride (an i32 argument below 2**31) meets a 32-bit index only if it is
    # a last-dimension stride, whose products with a lane index the launcher bounds
    wraps = [f"{r['kernel']} {r['variant']}: {p['stride']}: {p['op']}" for r in rows
             for p in r["int32_stride_products"] if not LAST_DIM_STRIDE.fullmatch(p["stride"])]
    assert not wraps, "\n".join(wraps)
    for r in rows:
        assert r["registers"] > 0
        lanes = sorted({p["stride"] for p in r["int32_stride_products"]})
        print(f"{r['kernel']:28s} {r['variant']:58s} {r['registers']:4d} registers, "
              f"{r['spill_bytes']:5d} B spill stores, {r['spill_loads']:5d} B loads; "
              f"32-bit lane products by {', '.join(lanes) or 'none'}")
