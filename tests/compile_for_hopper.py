"""Compile the Triton kernels for an H100 (sm_90a) on a machine without a GPU.

Run by tests/test_triton_compile.py in a subprocess (Triton's interpreter must be off to
compile). The interpreter tests check what the kernels compute; this checks that every variant
also compiles for the GPU the autotune configurations target (an error the interpreter never
meets: a type mismatch in a branch, an op the backend lacks). Prints one JSON line per variant:
{"kernel", "variant", "ok", "error", "registers", "spill_bytes"} (ptxas's own report),
"int32_stride_products" (offsets that could wrap past 2**31).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import iddc_kernels.pair_sums as ps

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, feat_dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types from the kernels' naming convention: *_ptr pointers (features and
    probabilities in feat_dtype, pcnt int32, gradients and sums float32), t_* float32, other
    ints (strides s_* included) int32, as the launcher passes any int below 2**31."""
    sig, const = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            const[(i,)] = constexprs[name]
        elif name.endswith("_ptr"):
            sig[name] = ("*" + feat_dtype) if name[0] in "up" and name != "psum_ptr" else \
                ("*i32" if name == "pcnt_ptr" else "*fp32")
        elif name in ("t_pos", "t_neg"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"no value for constexpr {missing} of {fn.__name__}")
    return sig, const


def ptxas_report(ptx: str) -> tuple[int, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", fh.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(fh.name)
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", out)), default=-1)
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", out))
    return regs, spills


def variants():
    """(kernel, name, feature dtype, constexprs, num_warps) covering every branch once: each h,
    atomic and deterministic (with both transposed passes), exact, tf32 and tf32x3 dots, 16-bit
    inputs, K up to 256, and the forward-only kernel."""
    cases = [  # h, feature dtype, feature-dot precision, BLOCK_K, tiles (I, J, D), warps, atomic
        (0, "fp32", "ieee", 32, (64, 32, 64), 4, True),
        (0, "fp32", "tf32", 32, (64, 64, 64), 4, False),
        (1, "bf16", "tf32", 256, (16, 32, 64), 8, True),
        (2, "fp16", "tf32", 64, (32, 64, 32), 4, False),
        (0, "fp32", "tf32x3", 32, (64, 32, 32), 8, False),
    ]
    for h, dt, fprec, k, tiles, warps, atomic in cases:
        blocks = dict(BLOCK_I=tiles[0], BLOCK_J=tiles[1], BLOCK_D=tiles[2], BLOCK_K=k)
        prec = dict(PRECISION=fprec, F_PRECISION=fprec)
        name = f"h{h}-{dt}-{fprec}-K{k}-{'atomic' if atomic else 'deterministic'}"
        yield ("_pair_sums_rows_kernel", name, dt,
               dict(HAS_POS=1, H=h, ATOMIC=atomic, NEED_GRAD=True, UPCAST=False, **prec,
                    **blocks), warps)
        if not atomic:
            for positive in (True, False):
                yield ("_pair_sums_cols_grad_kernel", f"{name}-{'pos' if positive else 'neg'}",
                       dt, dict(POSITIVE=positive, H=h, ACCUMULATE=not positive, UPCAST=False,
                                **prec, **blocks), warps)
    # launches after the first 8 shifts: negative sets only
    yield ("_pair_sums_rows_kernel", "h0-bf16-tf32-K32-shifts-only", "bf16",
           dict(HAS_POS=0, H=0, ATOMIC=True, NEED_GRAD=True, UPCAST=False, PRECISION="tf32",
                F_PRECISION="tf32", BLOCK_I=64, BLOCK_J=32, BLOCK_D=32, BLOCK_K=32), 8)
    yield ("_pair_sums_rows_kernel", "h0-fp32-ieee-K32-forward-only", "fp32",
           dict(HAS_POS=1, H=0, ATOMIC=True, NEED_GRAD=False, UPCAST=False, PRECISION="ieee",
                F_PRECISION="ieee", BLOCK_I=64, BLOCK_J=32, BLOCK_D=64, BLOCK_K=32), 4)


def int32_stride_products(ttir: str) -> list:
    """The 32-bit multiplies by a stride argument in a kernel's TTIR: an offset that can wrap
    (the kernels widen every index to int64 before it meets a stride)."""
    return [line.strip().split(" loc(")[0] for line in ttir.splitlines()
            if "arith.muli" in line and line.rstrip().split(" loc(")[0].endswith(": i32")
            and re.search(r"%s_\w+", line)]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: kernels cannot be compiled", file=sys.stderr)
        return 2
    for kernel, name, dt, consts, warps in variants():
        fn = getattr(ps, kernel)
        row = {"kernel": kernel, "variant": name}
        try:
            sig, const = signature(fn, dt, consts)
            compiled = triton.compile(ASTSource(fn, sig, constexprs=const), target=TARGET,
                                      options=dict(num_warps=warps, num_stages=2))
            row["registers"], row["spill_bytes"] = ptxas_report(compiled.asm["ptx"])
            row["int32_stride_products"] = int32_stride_products(compiled.asm["ttir"])
            row["ok"] = True
        except Exception as err:  # reported, not raised: the test lists every failure
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[-2000:]}")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
