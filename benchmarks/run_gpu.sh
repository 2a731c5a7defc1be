#!/usr/bin/env bash
# The GPU checks of one session with a CUDA machine, in two stages that each end well inside
# ten minutes on one H100 (16 CPU cores), run from the repository root:
#
#   bash benchmarks/run_gpu.sh tests OUTDIR   # the tests that run on CUDA when it is there,
#                                             # natively, 8 xdist workers (Triton compiles on
#                                             # the CPU: the workers share that work)
#   bash benchmarks/run_gpu.sh bench OUTDIR   # benchmarks/test_bench_triton.py: JSON, table,
#                                             # autotuner log (every candidate's time)
#
# Uses the machine's own PyTorch and Triton (the package is installed without dependencies),
# so nothing is downloaded. OUTDIR receives gpu.txt (device, driver, versions) and the stage's
# log, JUnit XML or benchmark JSON, written as they go (a stage cut off still leaves its log).
set -euo pipefail
usage="usage: bash benchmarks/run_gpu.sh tests|bench OUTDIR"
stage=${1:?$usage}
out=${2:?$usage}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

"$py" -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || {
  cat "$out/install.log" >&2; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$py" -c "
import torch, triton
props = torch.cuda.get_device_properties(0)
print('torch', torch.__version__, 'triton', triton.__version__)
print('device', props.name, 'SMs', props.multi_processor_count)"  || true
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

case "$stage" in
  tests)
    workers=()
    if "$py" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi
    # the rest of the suite tests CPU behaviour (CLIs, data, files): CI runs it
    "$py" -m pytest "${workers[@]}" -q -p no:cacheprovider --durations=25 \
      --junitxml "$out/tests.xml" tests/test_triton_pair_sums.py tests/test_train_fused.py \
      tests/test_loss_edge_cases.py tests/test_streaming.py 2>&1 | tee "$out/tests.log"
    ;;
  bench)
    # TRITON_PRINT_AUTOTUNING: the log names each key's winner and its tuning time
    TRITON_PRINT_AUTOTUNING=1 "$py" -m pytest -q -p no:cacheprovider -rs \
      --benchmark-json "$out/bench.json" benchmarks/test_bench_triton.py 2>&1 \
      | tee "$out/bench.log"
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
