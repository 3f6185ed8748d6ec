#!/usr/bin/env bash
# One command for a lent GPU: install, GPU tests, PEMS07 benchmark and the scaling sweep, with
# raw results (device, versions, commit in every row and in env.txt) under one folder.
#
#   bash bench/gpu_run.sh [STAGE...]      STAGE: env install tests bench scale (default: all)
#
# Stages run in the order given; each has its own time limit so the whole run fits in 25 minutes
# on one H100 (install ~2 min, tests ~6, bench ~8, scale ~8). A machine without a package
# registry is fine: the install uses --no-deps (torch, triton, pandas, pytest come with the
# machine). Environment:
#   RESULTS   output folder (default bench/results/gpu-<gpu name>)
#   HIMNET_FAST_GIT_COMMIT   the commit, when the tree travels without .git
#   OUT       if set, a tarball of RESULTS is written there too (one file to fetch)
#   BATCH     batch size of the PEMS07 benchmark (default 16, the paper's)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(env install tests bench scale)
py=${PYTHON:-python3}
gpu=$($py -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'none')" 2>/dev/null)
if [ "$gpu" = "none" ] || [ -z "$gpu" ]; then echo "gpu_run.sh: no CUDA device visible to $py" >&2; exit 2; fi
RESULTS=${RESULTS:-bench/results/gpu-${gpu}}
BATCH=${BATCH:-16}
mkdir -p "$RESULTS"
if [ -z "${HIMNET_FAST_GIT_COMMIT:-}" ]; then
  HIMNET_FAST_GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown); export HIMNET_FAST_GIT_COMMIT
fi
status=0
run() {  # run LIMIT_S NAME CMD...: time-limited, logged, failures counted but not fatal
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$RESULTS/stages.log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$RESULTS/stages.log"
  [ "$rc" -eq 0 ] || status=1
}
for stage in "${stages[@]}"; do
  case $stage in
    env)
      { echo "commit: $HIMNET_FAST_GIT_COMMIT"; date -u +"date: %Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
        $py -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); p = torch.cuda.get_device_properties(0); print('sms', p.multi_processor_count, 'mem_gib', round(p.total_memory / 2**30, 1))"
        nvcc --version | tail -n 2; } > "$RESULTS/env.txt" 2>&1
      cat "$RESULTS/env.txt" ;;
    install)
      run 300 install env HIMNET_FAST_BUILD_CUDA=1 $py -m pip install --no-deps --no-build-isolation -e .
      run 60 info $py -m himnet_fast info ;;
    tests)
      # The GPU suites (compiled Triton at real sizes, the CUDA extension, captured inference),
      # then the Triton kernel suite, which on a GPU runs compiled instead of interpreted.
      run 420 tests_gpu $py -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$RESULTS/tests_gpu.xml"
      run 300 tests_triton $py -m pytest tests/test_triton_kernels.py tests/test_modules.py -m "not slow" -q \
        -p no:cacheprovider --junitxml="$RESULTS/tests_triton.xml" ;;
    bench)
      run 540 bench_pems07 $py -m himnet_fast bench --preset pems07 --device cuda --batch-size "$BATCH" \
        --timeout-s 240 --out "$RESULTS" ;;
    scale)
      run 540 scale_pems07 $py -m himnet_fast scale --preset pems07 --device cuda --batch-size 1 \
        --nodes 883,2352,8600,20000,100000 --providers reference,reference-compile,torch,triton,cuda \
        --modes train --timeout-s 150 --out "$RESULTS" ;;
    *) echo "gpu_run.sh: unknown stage $stage (env install tests bench scale)" >&2; exit 2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"; fi
exit $status
