#!/usr/bin/env bash
# Run benchmark 5 on a GPU machine, within a time budget, writing JSON and logs to $OUT (or gpu-out/).
#   bash bench/gpu_device.sh [all|after-fast|after-fast-256|after-pab|ltx-fast-50|wan-large|wan-768x512|wan-768x768|wan-fast|wan-fast-20|tiny] [seconds]
# all (default): LTX 2B at the four sizes (eager, compile, the fast tier on eager blocks and standard
# jobs after it, the fast tier compiled and standard jobs after it, fast-schedule, and the overlap of
# generation and encoding at 768x512x121), then Wan2.1 1.3B at 256x256x17 and 512x512x65 with what
# time is left. after-fast: the same LTX configurations but fast-schedule, at 256x256x17 and
# 768x512x121 only (whether standard jobs keep their compiled speed after fast ones, and which way
# of running the fast tier keeps it). wan-large: Wan at 768x512x121 and 768x768x129, 10 steps, once;
# wan-768x512 and wan-768x768: one of those sizes each (a few minutes each on an H100).
# after-fast-256: LTX at 256x256x17 only, compile, fast and after-fast, 5 calls each (with BENCH_ARGS, e.g.
# "--recompile-limit 64", to try a remedy).
# BENCH_ARGS: more options for gpu_pipeline.py, added to each run's.
# wan-fast: Wan, 10 steps: eager at 256x256x17 with 5 repeats, then the fast tier (compiled) at
# 768x512x121 and 768x768x129. wan-fast-20: the fast tier at 768x768x129 with 20 steps.
# after-pab: LTX at 768x512x121 and 768x768x129, compiled standard jobs, the fast tier as
# PyramidAttentionBroadcast (a registry that sets it), then standard jobs after it, 3 calls each.
# ltx-fast-50: LTX at 768x512x121 with the models' default 50 steps, eager and the fast tier, once.
# tiny: the tiny models, to try this script on a machine without a GPU.
# Wheels found in .whl/ (bench/gpu_wheels.sh) are installed first when diffusers is missing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}  # the Python that has torch
plan=${1:-all}
budget=${2:-570}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# torch.compile's recompilations, each with its reason, go to the logs: whether standard jobs
# recompile (or reach the recompile limit and run eagerly) after fast ones is read there.
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
if ! "$py" -c "import diffusers" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c "import diffusers, torch; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
status=0
run() {  # name, seconds allowed (at most what is left of the budget), arguments of gpu_pipeline.py
  local name=$1 allowed=$2 rc
  shift 2
  if ((allowed > budget - SECONDS)); then allowed=$((budget - SECONDS)); fi
  if ((allowed < 60)); then
    echo "$name: skipped, ${allowed}s left"
    status=1
    return
  fi
  # shellcheck disable=SC2086  # BENCH_ARGS: more options of gpu_pipeline.py, e.g. --recompile-limit 64
  timeout "$allowed" "$py" bench/gpu_pipeline.py --budget-s $((allowed - 40)) --out "$out/$name.json" "$@" ${BENCH_ARGS:-} \
    >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after ${SECONDS}s"
  grep -h '"config"\|"attention_backend"\|"skipped"' "$out/$name.log" | cut -c1-700
  echo "$name: $(grep -c 'Recompiling function' "$out/$name.log") recompilations"
  grep -h 'hit config\|triggered by the following guard failure' -A2 "$out/$name.log" | cut -c1-300 | head -40
  if ((rc != 0)); then status=$rc; fi
}
case $plan in
  all)
    run gpu-pipeline-ltx $((budget * 55 / 100)) --families ltx --steps 20 --repeats 1 --overlap 3 \
      --configs eager,compile,fast-eager,after-fast-eager,fast,after-fast,fast-schedule
    run gpu-pipeline-wan "$budget" --families wan --steps 20 --repeats 1 --sizes 256x256x17,512x512x65 \
      --configs eager,compile,fast-eager,after-fast-eager,fast,after-fast,fast-schedule
    ;;
  after-fast)
    run gpu-pipeline-ltx-after-fast "$budget" --families ltx --steps 20 --repeats 1 \
      --sizes 256x256x17,768x512x121 --configs eager,compile,fast-eager,after-fast-eager,fast,after-fast
    ;;
  wan-large | wan-768x512 | wan-768x768)
    sizes=768x512x121,768x768x129
    if [[ $plan == wan-768x512 ]]; then sizes=768x512x121; fi
    if [[ $plan == wan-768x768 ]]; then sizes=768x768x129; fi
    run "gpu-pipeline-$plan" "$budget" --families wan --steps 10 --repeats 1 \
      --sizes "$sizes" --configs eager,compile,fast,after-fast
    ;;
  after-fast-256)
    run "gpu-pipeline-ltx-after-fast-256${BENCH_ARGS:+-$(echo $BENCH_ARGS | tr -dc 'a-z0-9')}" "$budget" --families ltx \
      --steps 20 --repeats 5 --sizes 256x256x17 --configs compile,fast,after-fast
    ;;
  wan-fast)
    run gpu-pipeline-wan-fast "$budget" --families wan --steps 10 --repeats 1 \
      --configs 'eager@256x256x17*5,fast@768x512x121+768x768x129'
    ;;
  after-pab)
    run gpu-pipeline-ltx-after-pab "$budget" --families ltx --steps 20 --repeats 3 \
      --sizes 768x512x121,768x768x129 --configs 'compile,fast-pab*1,after-fast-pab'
    ;;
  ltx-fast-50)
    run gpu-pipeline-ltx-fast-50 "$budget" --families ltx --steps 50 --repeats 1 --sizes 768x512x121 \
      --configs eager,fast
    ;;
  wan-fast-20)
    run gpu-pipeline-wan-fast-20 "$budget" --families wan --steps 20 --repeats 1 --configs 'fast@768x768x129'
    ;;
  tiny)
    run gpu-pipeline-tiny "$budget" --tiny --steps 2 --repeats 1 --attention-backends native --overlap 2 \
      --configs 'eager*2,compile,fast-eager,after-fast-eager,fast,after-fast,fast-pab,after-fast-pab,fast-schedule'
    ;;
  *)
    echo "unknown plan: $plan" >&2
    exit 2
    ;;
esac
exit $status
