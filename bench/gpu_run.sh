#!/usr/bin/env bash
# One command for a lent GPU: install, GPU tests, PEMS07 benchmark and the scaling sweep, with
# raw results (device, versions, commit in every row and in env.txt) under one folder.
#
#   bash bench/gpu_run.sh [STAGE...]      STAGE: env install tests bench compile scale (default: all)
#
# Stages run in the order given, each under its own time limit; the whole run fits in 25 minutes
# on one H100 (measured there: install 19 s with the CUDA extension, GPU tests 113 s, the eager
# bench 3.5 min; the compile bench ~6.5 min, mostly torch.compile). A device call is capped at
# 10 minutes, so split the stages over calls, e.g. "env install tests bench", then "compile",
# then "scale". With OUT set, the tarball is rewritten after every stage, so a call cut off
# still returns what finished. A machine without a package registry is fine: the install uses
# --no-deps (torch, triton, pandas, pytest come with the machine). Environment:
#   RESULTS   output folder (default bench/results/gpu-<gpu name>)
#   HIMNET_FAST_GIT_COMMIT   the commit, when the tree travels without .git
#   OUT       if set, a tarball of RESULTS is written there after every stage (one file to fetch)
#   BATCH     batch size of the PEMS07 benchmark (default 16, the paper's)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(env install tests bench compile scale)
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
pack() {  # one tarball of everything so far: a device call cut off later still returns it
  if [ -n "${OUT:-}" ]; then tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"; fi
}
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
  pack
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
      # (tests/test_triton_kernels.py is the interpreter suite: it needs TRITON_INTERPRET=1 and
      # CPU tensors, so it is not run here.)
      run 420 tests_gpu $py -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$RESULTS/tests_gpu.xml" ;;
    bench)  # measured 3.5 min: the model and the three ops, eager providers
      run 500 bench_pems07 $py -m himnet_fast bench --preset pems07 --device cuda --batch-size "$BATCH" \
        --providers reference,torch,triton,cuda --repeats 10 --timeout-s 60 --out "$RESULTS/eager" ;;
    compile)  # measured ~6.5 min, mostly compilation: torch.compile of the original and of ours
      run 560 bench_pems07_compile $py -m himnet_fast bench --preset pems07 --device cuda --batch-size "$BATCH" \
        --providers reference-compile,torch-compile --what himnet --repeats 10 --timeout-s 240 --out "$RESULTS/compile" ;;
    scale)
      run 560 scale_pems07 $py -m himnet_fast scale --preset pems07 --device cuda --batch-size 1 \
        --nodes 883,2352,8600,20000,100000 --providers reference,torch,triton \
        --modes train --repeats 5 --timeout-s 90 --out "$RESULTS/scale" ;;
    *) echo "gpu_run.sh: unknown stage $stage (env install tests bench compile scale)" >&2; exit 2 ;;
  esac
done
pack
exit $status
