#!/usr/bin/env bash
# A GPU session's checks in one command that ends inside a time budget (the lent machine gives
# a session 15 minutes in all, its start included, and 10 minutes a command). From the repo root:
#
#   bash benchmarks/run_gpu.sh [all] OUTDIR   # everything below, most needed first
#   bash benchmarks/run_gpu.sh core OUTDIR    # only the benchmark rows issue 3's targets name
#   bash benchmarks/run_gpu.sh tests OUTDIR   # only the tests that run on CUDA, natively
#   bash benchmarks/run_gpu.sh bench OUTDIR   # only the benchmarks (core rows, then the rest)
#
# "all" runs, each step cut off at what is left of IDDC_GPU_BUDGET_S (default 510 s) and
# skipped when too little is left (the warm step at most IDDC_GPU_WARM_S, default 200 s, the
# core step at most IDDC_GPU_CORE_S, default 240 s):
#   1. warm: benchmarks/warm_triton_cache.py compiles every kernel the benchmarks will launch
#      (every autotune candidate) in parallel processes, so the autotuner's serial compiles
#      become cache hits;
#   2. core: the rows issue 3's targets name (B=64, N=784 and 3136: triton and the reference at
#      tf32 and exact float32) -> bench-core.json;
#   3. tests: the test files that use CUDA when present, natively, over xdist workers;
#   4. rest: every other benchmark row (authors' formulation, streaming, tf32x3, bf16,
#      deterministic) -> bench-rest.json.
#
# Uses the machine's own PyTorch and Triton (the package is installed without dependencies),
# so nothing is downloaded. OUTDIR receives at most 7 files (the lent machine returns 8):
# gpu.txt (device, driver, versions), run.log (everything, as it goes), tests.xml,
# bench-core.json, bench-rest.json; a step cut off still leaves its log.
set -uo pipefail
usage="usage: bash benchmarks/run_gpu.sh [all|core|tests|bench] OUTDIR"
case "${1:-}" in
  all|core|tests|bench) [ $# -eq 2 ] || { echo "$usage" >&2; exit 2; } ;;  # a stage needs OUTDIR
  *) [ $# -eq 1 ] || { echo "$usage" >&2; exit 2; }; set -- all "$1" ;;
esac
stage=$1
mkdir -p "$2"
out=$(cd "$2" && pwd)  # from the caller's folder, before the cd below
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
budget=${IDDC_GPU_BUDGET_S:-510}
export PYTHONUNBUFFERED=1
failures=0

left() { echo $(( budget - SECONDS )); }

# step NAME MIN_SECONDS MAX_SECONDS CMD...: run CMD for what is left of the budget, at most
# MAX_SECONDS (SIGINT first, so pytest still writes its XML/JSON), or skip it when less than
# MIN_SECONDS is left
step() {
  local name=$1 need=$2 most=$3; shift 3
  local rest; rest=$(left)
  if [ "$rest" -lt "$need" ]; then
    echo "=== $name: SKIPPED, ${rest}s of the budget left (needs ${need}s)"
    failures=$((failures + 1)); return
  fi
  [ "$rest" -le "$most" ] || rest=$most
  echo "=== $name: start at ${SECONDS}s, ${rest}s allowed"
  timeout -s INT -k 20 "$rest" "$@"
  local rc=$?
  echo "=== $name: exit $rc at ${SECONDS}s"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

main() {
  # offline: no index, no pip self-check; if the editable install cannot map iddc_kernels to
  # kernels/ (an old setuptools), the checkout is put on the path instead
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install -q --no-index --no-deps \
        --no-build-isolation -e . || ! "$py" -c "import iddc, iddc_kernels"; then
    echo "editable install failed or incomplete: using the checkout on PYTHONPATH"
    local shim; shim=$(mktemp -d)
    ln -sfn "$PWD/kernels" "$shim/iddc_kernels"
    export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "import iddc, iddc_kernels" || { echo "cannot import iddc / iddc_kernels"; exit 1; }
  fi
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$py" -c "import torch, triton; p = torch.cuda.get_device_properties(0); print('torch', \
torch.__version__, 'triton', triton.__version__); print('device', p.name, 'SMs', \
p.multi_processor_count)" || true
  } >"$out/gpu.txt" 2>&1
  cat "$out/gpu.txt"

  workers=()
  if "$py" -c "import xdist" 2>/dev/null; then workers=(-n "${IDDC_GPU_TEST_WORKERS:-12}"); fi
  bench=benchmarks/test_bench_triton.py::test_pair_sums_gpu
  core_ids=()
  for id in N784-triton-tf32 N784-reference-tf32 N784-triton-ieee N784-reference-ieee \
            N3136-triton-tf32 N3136-reference-tf32 N3136-triton-ieee N3136-reference-ieee; do
    core_ids+=("$bench[$id]")
  done

  # capped: a slow warm-up must leave the core rows their time (what it compiled still counts)
  warm() { step warm 60 "${IDDC_GPU_WARM_S:-200}" "$py" benchmarks/warm_triton_cache.py; }
  core() {
    # TRITON_PRINT_AUTOTUNING: the log names each key's winner and its tuning time
    # capped, so the tests always get their turn
    step core 120 "${IDDC_GPU_CORE_S:-240}" env TRITON_PRINT_AUTOTUNING=1 "$py" -m pytest -q -p no:cacheprovider -rs \
      --benchmark-json "$out/bench-core.json" "${core_ids[@]}"
  }
  tests() {
    # the rest of the suite tests CPU behaviour (CLIs, data, files): CI runs it
    step tests 90 "$budget" "$py" -m pytest "${workers[@]}" -q -p no:cacheprovider --durations=15 \
      --junitxml "$out/tests.xml" tests/test_triton_pair_sums.py tests/test_train_fused.py \
      tests/test_loss_edge_cases.py tests/test_streaming.py tests/test_pair_inputs.py
  }
  rest() {
    local deselect=()
    for id in "${core_ids[@]}"; do deselect+=(--deselect "$id"); done
    step rest 60 "$budget" env TRITON_PRINT_AUTOTUNING=1 "$py" -m pytest -q -p no:cacheprovider -rs \
      --benchmark-json "$out/bench-rest.json" benchmarks/test_bench_triton.py "${deselect[@]}"
  }

  case "$stage" in
    all) warm; core; tests; rest ;;
    core) warm; core ;;
    tests) tests ;;
    bench) warm; core; rest ;;
  esac
  echo "=== run_gpu.sh $stage: done at ${SECONDS}s of a ${budget}s budget, $failures step(s) failed or skipped"
  [ "$failures" -eq 0 ]
}

main 2>&1 | tee -a "$out/run.log"
exit "${PIPESTATUS[0]}"
