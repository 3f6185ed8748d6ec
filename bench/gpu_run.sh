#!/usr/bin/env bash
# One command for a lent GPU: install, the headline benchmark, the GPU tests and the trainer's
# epoch, with raw results (device, versions, commit in every row and in env.txt) under one folder.
#
#   bash bench/gpu_run.sh [STAGE...]   STAGE: env install headline tests train bench compile scale
#
# The default stages (env install headline tests train) are sized to one device call: their time
# limits add up to 10 minutes (install 90 s, info 30 s, headline 270 s, tests 150 s, train 60 s),
# the headline table first, so a short GPU slot still yields it:
#   headline  PEMS07 B=16, training step and inference: the original, the captured step on the
#             default backend and on the fused Triton step (fp32, and bf16 for the fused step),
#             the default eager model (each provider in its own process);
#   tests     the GPU suites (pytest -m gpu, 8 workers);
#   train     one epoch (200 batches) of the trainer: captured, --no-capture and the original model.
# The longer stages run on request, each under its own limit: bench (every eager provider and the
# ops), compile (torch.compile of the original and of ours: minutes of compilation), scale (large
# graphs). A device call is capped at 10 minutes, so split those over calls. With OUT set, a
# tarball of RESULTS is rewritten after every stage, so a call cut off still returns what finished.
# A machine without a package registry is fine: the install uses --no-deps (torch, triton, pandas,
# pytest come with the machine). Environment:
#   RESULTS   output folder (default bench/results/gpu-<gpu name>)
#   HIMNET_FAST_GIT_COMMIT   the commit, when the tree travels without .git
#   OUT       if set, a tarball of RESULTS is written there after every stage (one file to fetch)
#   BATCH     batch size of the PEMS07 benchmarks (default 16, the paper's)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(env install headline tests train)
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
      run 90 install env HIMNET_FAST_BUILD_CUDA=1 $py -m pip install --no-deps --no-build-isolation -e .
      run 30 info $py -m himnet_fast info ;;
    headline)  # the table asked of every GPU run: captured vs eager vs the original, train and infer
      run 270 headline_pems07 $py -m himnet_fast bench --preset pems07 --device cuda --batch-size "$BATCH" \
        --what himnet --modes train,infer \
        --providers reference,captured,captured-triton,captured-triton-bf16,torch \
        --repeats 10 --timeout-s 45 --out "$RESULTS/headline"
      [ -f "$RESULTS/headline/bench_pems07_cuda_b${BATCH}.md" ] && cat "$RESULTS/headline/bench_pems07_cuda_b${BATCH}.md" ;;
    tests)
      # The GPU suites (compiled Triton at real sizes, the CUDA extension, captured inference and
      # training). (tests/test_triton_kernels.py is the interpreter suite: it needs
      # TRITON_INTERPRET=1 and CPU tensors, so it is not run here.)
      run 150 tests_gpu $py -m pytest tests -m gpu -q -p no:cacheprovider -n 8 --junitxml="$RESULTS/tests_gpu.xml" ;;
    train)  # one epoch of the trainer: captured, eager, the original model
      run 60 train_epoch $py bench/bench_train_epoch.py --device cuda --batches 100 --out "$RESULTS/train_epoch" ;;
    bench)  # measured 3.5 min: the model and the three ops, eager providers
      run 500 bench_pems07 $py -m himnet_fast bench --preset pems07 --device cuda --batch-size "$BATCH" \
        --providers reference,torch,triton,cuda --repeats 10 --timeout-s 60 --out "$RESULTS/eager" ;;
    compile)  # measured ~6.5 min, mostly compilation: torch.compile of the original and of ours
      run 560 bench_pems07_compile $py -m himnet_fast bench --preset pems07 --device cuda --batch-size "$BATCH" \
        --providers reference-compile-notf,torch-compile --what himnet --repeats 10 --timeout-s 240 \
        --out "$RESULTS/compile" ;;
    scale)
      run 560 scale_pems07 $py -m himnet_fast scale --preset pems07 --device cuda --batch-size 1 \
        --nodes 883,2352,8600,20000,100000 --providers reference,torch,triton \
        --modes train --repeats 5 --timeout-s 90 --out "$RESULTS/scale" ;;
    *) echo "gpu_run.sh: unknown stage $stage (env install headline tests train bench compile scale)" >&2; exit 2 ;;
  esac
done
pack
exit $status
