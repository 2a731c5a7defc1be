"""Compile the Triton kernels for an H100 (sm_90a) on a machine without a GPU.

Run by tests/test_triton_compile.py in a subprocess (Triton's interpreter must be off to
compile). The interpreter tests check what the kernels compute; this checks that every variant
also compiles for the GPU the autotune configurations target (an error the interpreter never
meets: a type mismatch in a branch, an op the backend lacks). Prints one JSON line per variant:
{"kernel", "variant", "config", "ok", "error", "registers", "spill_bytes" (spill stores),
"spill_loads", "int32_stride_products"}.

Each variant is compiled twice:

* as Triton's JIT specialises it for a realistic contiguous call of the loss (``CALL``: B=64,
  N=M=3136, D=384, K per variant): an int argument equal to 1 becomes a constexpr, ints
  divisible by 16 and the (16-byte aligned) pointers get ``tt.divisibility`` 16, the
  ``do_not_specialize`` ones (the shifts r0..r7) stay plain. Its ptxas report ("registers",
  "spill_bytes", with Triton's own ptxas flags) is what runs on the GPU for contiguous inputs;
* unspecialised (every int a plain i32, as a non-contiguous call gets): its TTIR is scanned for
  32-bit multiplies by a stride ("int32_stride_products": {"stride", "op"}), an offset that
  could wrap past 2**31 (specialised, the unit strides vanish and so would their products).

Tiles, warps and stages are the kernels' own: ``fixed_config`` (the deterministic mode, exactly
the tiles that run) and ``autotune_candidates`` (the default mode, one real candidate each).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import iddc_kernels.pair_sums as ps

TARGET = GPUTarget("cuda", 90, 32)
#: the call the specialised compiles describe: batch 64, 56 x 56 tokens per view, ViT-S
#: features, 3 negative shifts (contiguous tensors, as iddc.loss passes them)
CALL = dict(B=64, N=3136, M=3136, D=384, S=3)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the dtype of each pointer as the launcher `_launch` passes it: features ("feat") in their
#: dtype, probabilities ("prob") in theirs (float32 from the loss, whatever the features),
#: gradients, partial sums and the unused scratch buffer float32, partial counts int32
POINTERS = {
    "_pair_sums_rows_kernel": dict(ua_ptr="feat", ub_ptr="feat", pa_ptr="prob", pb_ptr="prob",
                                   ga_ptr="fp32", gb_ptr="fp32", psum_ptr="fp32",
                                   pcnt_ptr="i32"),
    "_pair_sums_cols_grad_kernel": dict(ur_ptr="feat", uc_ptr="feat", pr_ptr="prob",
                                        pc_ptr="prob", gc_ptr="fp32"),
}
#: ptxas flags of Triton's own make_cubin (3.8): register allocation differs without
#: --regAllocOptLevel=2
PTXAS_FLAGS = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a"]


def _contiguous(*shape) -> tuple:
    """Strides of a contiguous tensor of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def launch_values(kernel: str, consts: dict, K: int, call: dict = CALL) -> dict:
    """The non-pointer, non-constexpr arguments `_launch` passes to `kernel` for contiguous
    tensors of `call`'s sizes (first launch: the positive set and up to 8 shifts; HAS_POS=0 is
    a later launch, whose gb is the scratch buffer with zero strides)."""
    B, N, M, D, S = call["B"], call["N"], call["M"], call["D"], call["S"]
    T = 1 + S
    shifts = tuple(range(1, S + 1))[:8]
    rpad = shifts + (0,) * (8 - len(shifts))
    u_a, u_b, p_a, p_b = _contiguous(B, N, D), _contiguous(B, M, D), _contiguous(B, N, K), \
        _contiguous(B, M, K)
    grad_a, grad_b = _contiguous(T, B, N, K), _contiguous(B, M, K)
    v = dict(t_pos=0.2, t_neg=0.12)
    if kernel == "_pair_sums_rows_kernel":
        need_grad, has_pos = bool(consts["NEED_GRAD"]), consts["HAS_POS"] == 1
        min_bi = min(getattr(ps, "_MIN_BLOCK_I", 16), consts["BLOCK_I"])
        ga = grad_a if need_grad else (0, 0, 0, 0)
        gb = grad_b if need_grad and has_pos else (0, 0, 0)
        v.update(B=B, N=N, M=M, D=D, K=K, NBLK=triton.cdiv(N, min_bi), NUM_SHIFTS=len(shifts),
                 N_KEY=triton.next_power_of_2(N), M_KEY=triton.next_power_of_2(M),
                 D_KEY=triton.next_power_of_2(D))
        names = ["s_uab", "s_uan", "s_uad", "s_ubb", "s_ubn", "s_ubd", "s_pab", "s_pan", "s_pak",
                 "s_pbb", "s_pbn", "s_pbk", "s_gat", "s_gab", "s_gan", "s_gak", "s_gbb", "s_gbn",
                 "s_gbk"]
        v.update(zip(names, u_a + u_b + p_a + p_b + ga + gb))
    elif kernel == "_pair_sums_cols_grad_kernel":
        positive = bool(consts["POSITIVE"])
        n_cols = M if positive else N
        uc, pc = (u_b, p_b) if positive else (u_a, p_a)
        gc = ((0,) + grad_b) if positive else _contiguous(S, B, N, K)
        v.update(B=B, N_ROWS=N, N_COLS=n_cols, D=D, K=K)
        names = ["s_urb", "s_urn", "s_urd", "s_ucb", "s_ucn", "s_ucd", "s_prb", "s_prn", "s_prk",
                 "s_pcb", "s_pcn", "s_pck", "s_gct", "s_gcb", "s_gcn", "s_gck"]
        v.update(zip(names, u_a + uc + p_a + pc + gc))
        rpad = (0,) * 8 if positive else rpad
    else:
        raise ValueError(f"no launch values for {kernel}")
    v.update({f"r{i}": r for i, r in enumerate(rpad)})
    return v


def _int_type(value: int) -> str:
    """Triton's type of a Python int argument."""
    if -2 ** 31 <= value < 2 ** 31:
        return "i32"
    return "u64" if value >= 2 ** 63 else "i64"


def signature(fn, feat: str, prob: str, consts: dict, values: dict, specialise: bool):
    """(signature, constexprs, attrs) for ASTSource, as the JIT builds them for a launch with
    `values` (specialise=True: ints equal to 1 become constexprs, ints divisible by 16 and the
    pointers, aligned, get tt.divisibility 16, except do_not_specialize parameters; False: no
    specialisation, every int a plain i32/i64 and every pointer of unknown alignment)."""
    pointers = POINTERS[fn.__name__]
    sig, const, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            if name not in consts:
                raise ValueError(f"no value for constexpr {name} of {fn.__name__}")
            sig[name] = "constexpr"
            const[(i,)] = consts[name]
        elif name.endswith("_ptr"):
            if name not in pointers:
                raise ValueError(f"no dtype known for pointer {name} of {fn.__name__}")
            kind = pointers[name]
            sig[name] = "*" + {"feat": feat, "prob": prob}.get(kind, kind)
            if specialise:
                attrs[(i,)] = divisible
        else:
            if name not in values:
                raise ValueError(f"no launch value for argument {name} of {fn.__name__}")
            value = values[name]
            if isinstance(value, float):
                sig[name] = "fp32"
                continue
            sig[name] = _int_type(value)
            if specialise and not p.do_not_specialize:
                if value == 1:
                    sig[name] = "constexpr"
                    const[(i,)] = 1
                elif value % 16 == 0:
                    attrs[(i,)] = divisible
    return sig, const, attrs


def variant(kernel: str, feat: str, prob: str, K: int, precision: str, *, h: int = 0,
            atomic: bool = True, positive: bool = True, has_pos: int = 1,
            need_grad: bool = True, tiles: str = "fixed", prefer: tuple = ()) -> dict:
    """One compile case. tiles="fixed": `fixed_config` (deterministic mode); "candidate": the
    autotune candidate (for K at CALL's D and `precision`) given by `prefer` (BLOCK_I, BLOCK_J,
    BLOCK_D, num_warps, num_stages), which must be one."""
    if tiles == "fixed":
        cfg = ps.fixed_config(K, precision)
    else:
        cands = ps.autotune_candidates(K, CALL["D"], precision)
        keys = ("BLOCK_I", "BLOCK_J", "BLOCK_D", "num_warps", "num_stages")
        cfg = next((c for c in cands if tuple(c[k] for k in keys) == tuple(prefer)), None)
        if cfg is None:  # a stale choice would silently compile another tile than named
            raise ValueError(f"{prefer} is no autotune candidate at K={K}, {precision}")
    cfg = dict(cfg)
    cfg.setdefault("num_warps", 4)  # the launcher's defaults for an explicit config
    cfg.setdefault("num_stages", 2)
    blocks = dict(BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"],
                  BLOCK_K=ps.block_k_of(K))
    common = dict(H=h, PRECISION=precision,
                  F_PRECISION=ps.feature_precision(TORCH_DTYPES[feat], precision), UPCAST=False,
                  **blocks)
    if kernel == "_pair_sums_rows_kernel":
        consts = dict(HAS_POS=has_pos, NEED_GRAD=need_grad, ATOMIC=atomic, **common)
        mode = "atomic" if atomic else "deterministic"
        mode += "" if has_pos else "-shifts-only"
        mode += "" if need_grad else "-forward-only"
    else:
        consts = dict(POSITIVE=positive, ACCUMULATE=not positive, **common)
        mode = "deterministic-cols-" + ("pos" if positive else "neg")
    dt = feat if prob == "fp32" else f"{feat}-p{prob}"
    tile = (f"{cfg['BLOCK_I']}x{cfg['BLOCK_J']}x{cfg['BLOCK_D']}-w{cfg['num_warps']}"
            f"s{cfg['num_stages']}")
    return dict(kernel=kernel, name=f"h{h}-{dt}-{precision}-K{K}-{mode}-{tile}", feat=feat,
                prob=prob, K=K, consts=consts, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], tiles=tiles)


def variants() -> list:
    """Every branch once: each h, atomic and deterministic (with both transposed passes),
    exact, tf32 and tf32x3 dots, 16-bit features (with the loss's float32 probabilities, and
    all 16-bit as a direct call may pass), K up to 256 (BLOCK_K 256), the launches after the
    first 8 shifts (HAS_POS=0) and the forward-only kernel. The deterministic ones compile
    `fixed_config`'s tiles, the atomic ones a real autotune candidate of each precision."""
    rows, cols = "_pair_sums_rows_kernel", "_pair_sums_cols_grad_kernel"
    out = []

    def deterministic(feat, prob, K, precision, h):
        out.append(variant(rows, feat, prob, K, precision, h=h, atomic=False))
        for positive in (True, False):
            out.append(variant(cols, feat, prob, K, precision, h=h, positive=positive))

    out.append(variant(rows, "fp32", "fp32", 27, "ieee", tiles="candidate",
                       prefer=(64, 32, 64, 4, 3)))
    out.append(variant(rows, "fp32", "fp32", 27, "tf32", tiles="candidate",
                       prefer=(64, 64, 32, 4, 3)))
    out.append(variant(rows, "fp32", "fp32", 27, "tf32x3", tiles="candidate",
                       prefer=(64, 32, 32, 8, 2)))
    out.append(variant(rows, "bf16", "fp32", 171, "tf32", h=1, tiles="candidate",
                       prefer=(16, 32, 64, 8, 2)))
    deterministic("fp32", "fp32", 27, "tf32", 0)
    deterministic("fp16", "fp16", 64, "tf32", 2)
    deterministic("fp32", "fp32", 27, "tf32x3", 0)
    out.append(variant(rows, "bf16", "fp32", 27, "tf32", has_pos=0, tiles="candidate",
                       prefer=(64, 32, 32, 8, 2)))
    out.append(variant(rows, "fp32", "fp32", 27, "ieee", need_grad=False, tiles="candidate",
                       prefer=(64, 32, 64, 4, 3)))
    return out


def jit_rule_mismatches(v: dict):
    """Where `signature`'s rule and the installed Triton's own specialisation
    (triton._C.libtriton.native_specialize_impl, private: a cross-check only) disagree on an
    argument of variant `v`, as "name: ours vs triton's"; None where that function is not
    there to ask."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return None
    fn = getattr(ps, v["kernel"])
    values = launch_values(v["kernel"], v["consts"], v["K"])
    sig, const, attrs = signature(fn, v["feat"], v["prob"], v["consts"], values, True)
    out = []
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name.endswith("_ptr"):
            continue
        try:
            ty, spec = native_specialize_impl(BaseBackend, values[p.name], False,
                                              not p.do_not_specialize, True)
        except TypeError:  # another signature: nothing to compare with
            return None
        theirs = (ty, "D" if ty != "constexpr" and spec == "D" else "")
        ours = (sig[p.name], "D" if (i,) in attrs else "")
        if ty == "constexpr":
            theirs, ours = (ty, spec), (sig[p.name], const.get((i,)))
        if ours != theirs:
            out.append(f"{p.name}={values[p.name]}: {ours} vs {theirs}")
    return out


def build(v: dict, specialise: bool):
    """triton.compile of variant `v` for sm_90a, JIT-specialised for CALL or not at all."""
    fn = getattr(ps, v["kernel"])
    values = launch_values(v["kernel"], v["consts"], v["K"])
    sig, const, attrs = signature(fn, v["feat"], v["prob"], v["consts"], values, specialise)
    return triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=TARGET,
                          options=dict(num_warps=v["num_warps"], num_stages=v["num_stages"]))


def plain_ttir(v: dict) -> str:
    """The TTIR of variant `v` compiled unspecialised. Only the front end and the TTIR passes
    run (half a compile: no ptxas) through triton.compiler's stages, as triton.compile runs
    them; where those internals differ (another Triton), a full compile gives it."""
    fn = getattr(ps, v["kernel"])
    values = launch_values(v["kernel"], v["consts"], v["K"])
    sig, const, attrs = signature(fn, v["feat"], v["prob"], v["consts"], values, False)
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    options = dict(num_warps=v["num_warps"], num_stages=v["num_stages"])
    try:
        from triton._C.libtriton import ir
        from triton.compiler.compiler import make_backend
        backend = make_backend(TARGET)
        opts = backend.parse_options(options)
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        stages: dict = {}
        backend.add_stages(stages, opts, src.language)
        module = src.make_ir(TARGET, opts, backend.get_codegen_implementation(opts),
                             backend.get_module_map(), context)
        return str(stages["ttir"](module, {}))
    except (AttributeError, ImportError, KeyError, TypeError):
        return build(v, specialise=False).asm["ttir"]


def ptxas_figures(ptx: str) -> dict:
    """ptxas -v on `ptx` with Triton's flags: registers, spill stores and loads (bytes), stack
    frame (bytes)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        out = subprocess.run([ptxas, *PTXAS_FLAGS, fh.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(fh.name)

    def total(pattern):
        return sum(int(m) for m in re.findall(pattern, out))
    return dict(registers=max((int(m) for m in re.findall(r"Used (\d+) registers", out)),
                              default=-1),
                spill_stores=total(r"(\d+) bytes spill stores"),
                spill_loads=total(r"(\d+) bytes spill loads"),
                stack=total(r"(\d+) bytes stack frame"))


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill-store bytes) of ptxas -v on `ptx`."""
    fig = ptxas_figures(ptx)
    return fig["registers"], fig["spill_stores"]


#: ops whose result is the operand's value, reshaped, broadcast or re-typed: a stride's value
#: travels through them to the multiply that uses it
_CARRY_OPS = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "tt.join",
              "tt.cat", "arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast",
              "ttg.convert_layout"}
_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?(?:\s*,\s*%[\w.$-]+)*\s*=\s*\"?([\w.]+)\"?\s*(.*)$")
_VALUE = re.compile(r"(%[\w.$-]+)(?:#\d+)?")
_I32 = re.compile(r"i32|tensor<(?:\d+x)+i32>")


def int32_stride_products(ttir: str, kernel: str, arg_names: list) -> list:
    """The 32-bit multiplies (scalar or tensor) of a value derived from a stride argument (s_*)
    in a kernel's TTIR, each as {"stride", "op"}: the stride is traced through splat,
    broadcast, expand_dims and the other ops of _CARRY_OPS, so `tt.splat %s_uad` then
    `arith.muli %dd, %splat : tensor<1x64xi32>` is found. `arg_names`: the kernel's
    non-constexpr parameters, which an unspecialised compile keeps as tt.func's arguments, in
    order."""
    head = next((line for line in ttir.splitlines()
                 if "tt.func" in line and "@" + kernel + "(" in line), None)
    lines = [line.split(" loc(")[0] for line in ttir.splitlines()]
    if head is None:
        raise ValueError(f"no tt.func @{kernel} in the TTIR")
    args = re.findall(r"(%[\w.$-]+)\s*:", head[head.index("("):])
    if len(args) != len(arg_names):
        raise ValueError(f"tt.func @{kernel} has {len(args)} arguments, the kernel "
                         f"{len(arg_names)} non-constexpr parameters: not an unspecialised "
                         "compile")
    derived = {a: {p} for a, p in zip(args, arg_names) if p.startswith("s_")}
    found = []
    for line in lines:
        m = _DEF.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        operands = _VALUE.findall(rest.split(" : ")[0] if " : " in rest else rest)
        strides = set().union(*(derived.get(o, set()) for o in operands))
        if not strides:
            continue
        if op in _CARRY_OPS:
            derived[result] = strides
        elif op == "arith.muli" and _I32.fullmatch(rest.rsplit(" : ", 1)[-1].strip()):
            found.extend({"stride": s, "op": line.strip()} for s in sorted(strides))
    return found


def report(v: dict) -> dict:
    """The JSON row of variant `v` (errors reported, not raised: the test lists every one)."""
    row = {"kernel": v["kernel"], "variant": v["name"],
           "config": dict(BLOCK_I=v["consts"]["BLOCK_I"], BLOCK_J=v["consts"]["BLOCK_J"],
                          BLOCK_D=v["consts"]["BLOCK_D"], BLOCK_K=v["consts"]["BLOCK_K"],
                          num_warps=v["num_warps"], num_stages=v["num_stages"],
                          tiles=v["tiles"])}
    try:
        compiled = build(v, specialise=True)
        fig = ptxas_figures(compiled.asm["ptx"])
        row.update(registers=fig["registers"], spill_bytes=fig["spill_stores"],
                   spill_loads=fig["spill_loads"])
        fn = getattr(ps, v["kernel"])
        row["int32_stride_products"] = int32_stride_products(
            plain_ttir(v), v["kernel"], [p.name for p in fn.params if not p.is_constexpr])
        row["jit_rule_mismatches"] = jit_rule_mismatches(v)
        row["ok"] = True
    except Exception as err:
        row.update(ok=False, error=f"{type(err).__name__}: {str(err)[-2000:]}")
    return row


def run_all(cases: list, processes: int = 2):
    """report() of every case, in order, `processes` compiles at a time."""
    if processes <= 1:
        yield from map(report, cases)
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap(report, cases)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: kernels cannot be compiled", file=sys.stderr)
        return 2
    processes = int(os.environ.get("IDDC_COMPILE_PROCESSES", min(2, os.cpu_count() or 1)))
    for row in run_all(variants(), processes):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
