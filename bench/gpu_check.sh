#!/usr/bin/env bash
# The GPU check (issue 12): the most useful checks of minicai on one GPU, in under 8 minutes.
#
#   bash bench/gpu_check.sh                                   # on a CUDA machine (--device cuda --dtype bf16)
#   bash bench/gpu_check.sh --device cpu --dtype bf16 --quick # the same steps on the CPU, at smaller sizes
#
# Steps (each one's output goes to the terminal and to $OUT/<step>.log; a failing step does not stop the others):
#   1 tests     the test suite (on a CUDA machine the stage scripts default to cuda/bf16), then
#               tests/test_precision.py with MINICAI_TEST_DEVICE=<device> (bf16 mixed precision on that device)
#   2 generate  bench/bench_generate.py: minicai's sampler vs transformers' generate, both in <dtype>
#   3 ppo       three PPO iterations of the default model (train_rl.py, a PM made from the same weights):
#               the iteration-0 check line (ratio exactly 1, KL exactly 0), seconds per iteration, peak memory
#   4 preset    pipeline.py --preset gpu for --preset-seconds (then stopped), peak memory
# and a summary at the end. Record the numbers in BENCHMARKS.md.
#
# Options: --device cuda|cpu (default cuda)  --dtype bf16|fp32|fp16 (default bf16)  --quick (smaller sizes: the CPU
# proof)  --preset-seconds N (default 150; quick 45)  --out DIR (default /tmp/minicai_gpu_check)
# --skip tests,generate,ppo,preset (steps to leave out).
set -uo pipefail

DEVICE=cuda DTYPE=bf16 QUICK=0 PRESET_SECONDS="" OUT=/tmp/minicai_gpu_check SKIP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --preset-seconds) PRESET_SECONDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$PRESET_SECONDS" ] || PRESET_SECONDS=$([ "$QUICK" = 1 ] && echo 45 || echo 150)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
declare -a SUMMARY

skipped() { [[ ",$SKIP," == *",$1,"* ]]; }
step() { echo; echo "== $1: $2 ($(date -u +%H:%M:%S), $(( $(date +%s) - START )) s in)"; }
record() { SUMMARY+=("$1"); }

# Peak memory of a Python entry point run in-process: GPU (torch.cuda.max_memory_allocated) or host (max RSS).
PEAK_RUNNER='
import resource, runpy, sys, torch
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        print(f"PEAK gpu {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved", flush=True)
    print(f"PEAK host {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS (largest child "
          f"process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB)", flush=True)
'

echo "minicai GPU check: device $DEVICE, dtype $DTYPE, quick $QUICK, out $OUT"
$PY -c "import torch; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available(),
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/env.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.log"

# ---- 1. the test suite ------------------------------------------------------------------------------------------
if ! skipped tests; then
  step 1 "test suite"
  SUITE=(tests)
  [ "$QUICK" = 1 ] && SUITE=(tests/test_precision.py tests/test_ppo.py)
  timeout 300 $PY -m pytest -q -x "${SUITE[@]}" 2>&1 | tail -n 15 | tee "$OUT/tests.log"
  record "tests: $(grep -E 'passed|failed|error' "$OUT/tests.log" | tail -n 1)"
  if [ "$DEVICE" != cpu ]; then
    MINICAI_TEST_DEVICE=$DEVICE timeout 120 $PY -m pytest -q tests/test_precision.py 2>&1 | tail -n 15 \
      | tee "$OUT/tests_precision_device.log"
    record "tests/test_precision.py on $DEVICE: $(grep -E 'passed|failed|error' "$OUT/tests_precision_device.log" | tail -n 1)"
  fi
fi

# ---- 2. decoding speed ------------------------------------------------------------------------------------------
if ! skipped generate; then
  step 2 "bench_generate ($DEVICE, $DTYPE)"
  GEN_ARGS=(--device "$DEVICE" --dtype "$DTYPE" --threads "$(nproc)")
  [ "$QUICK" = 1 ] && GEN_ARGS+=(--batches 1,4 --new-tokens 16 --repeats 1) || GEN_ARGS+=(--batches 1,16,64)
  [ "$DTYPE" = fp16 ] && GEN_ARGS=("${GEN_ARGS[@]/fp16/bf16}")  # bench_generate knows fp32 and bf16
  timeout 240 $PY bench/bench_generate.py "${GEN_ARGS[@]}" 2>&1 | grep -v Warning | tee "$OUT/generate.log"
  record "generate: $(grep -E '^\| [0-9]' "$OUT/generate.log" | tr '\n' ' ')"
fi

# ---- 3. three PPO iterations of the default model ---------------------------------------------------------------
if ! skipped ppo; then
  step 3 "3 PPO iterations of the default model ($DEVICE, $DTYPE)"
  $PY - "$OUT/pm" <<'EOF'
import sys
from minicai.model import Transformer
from minicai.reward import RewardModel
from minicai.tokenizer import ChatTokenizer
from minicai.weights import resolve_model
path = resolve_model(None)  # the default model: its trunk with a random head stands in for a trained PM
RewardModel.from_lm(Transformer.from_pretrained(path), head_init="normal", seed=0).save_pretrained(sys.argv[1])
ChatTokenizer.from_dir(path).save(sys.argv[1])
EOF
  PPO_ARGS=(--model default --pm "$OUT/pm" --out "$OUT/rl" --iterations 3 --save-every 100 --device "$DEVICE"
            --dtype "$DTYPE")
  [ "$QUICK" = 1 ] && PPO_ARGS+=(--batch-size 4 --minibatch-size 2 --max-new-tokens 16)
  rm -rf "$OUT/rl"
  timeout 300 $PY -c "$PEAK_RUNNER" train_rl.py "${PPO_ARGS[@]}" 2>&1 | tr '\r' '\n' | grep -v "RL-CAI:" \
    | tee "$OUT/ppo.log"
  [ "${PIPESTATUS[0]}" = 124 ] && record "ppo: stopped at the step's 300 s limit (iterations below: those finished)"
  $PY - "$OUT/rl/metrics.jsonl" <<'EOF' | tee -a "$OUT/ppo.log"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"iteration {r['iteration']}: rollout {r['rollout_s']:.2f} s + update {r['update_s']:.2f} s, score "
          f"{r['score']:+.3f}, kl {r['kl']:.3f}, sampler gap {r['sampler_logprob_maxdiff']:.3g}")
EOF
  record "ppo: $(grep -m1 'check before the first update' "$OUT/ppo.log")"
  record "ppo: $(grep '^iteration' "$OUT/ppo.log" | tail -n 2 | tr '\n' ' ')"
  record "ppo: $(grep '^PEAK' "$OUT/ppo.log" | tr '\n' ' ')"
fi

# ---- 4. the gpu preset, for a few minutes -----------------------------------------------------------------------
if ! skipped preset; then
  step 4 "pipeline.py --preset gpu for $PRESET_SECONDS s ($DEVICE, $DTYPE)"
  rm -rf "$OUT/preset"
  SAMPLER_PID=""
  if command -v nvidia-smi >/dev/null; then  # GPU memory in use, sampled twice a second (all processes)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/preset_gpu_mem.log" &
    SAMPLER_PID=$!
  fi
  # SIGINT: pipeline.py's subprocess.call then stops the running stage too
  timeout -s INT -k 20 "$PRESET_SECONDS" $PY -c "$PEAK_RUNNER" pipeline.py --preset gpu --out "$OUT/preset" --device "$DEVICE" \
    --dtype "$DTYPE" 2>&1 | tr '\r' '\n' | awk 'NR % 20 == 1 || /==|error|check|Error|PEAK/' | tee "$OUT/preset.log"
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
  [ -s "$OUT/preset_gpu_mem.log" ] && record "preset: peak GPU memory in use $(sort -n "$OUT/preset_gpu_mem.log" \
    | tail -n 1) MiB (nvidia-smi)"
  record "preset: $(grep '^PEAK' "$OUT/preset.log" | tr '\n' ' ')"
  record "preset: reached $(grep '^== ' "$OUT/preset.log" | tail -n 1 | cut -c1-60) ... in $PRESET_SECONDS s; \
$(cat "$OUT/preset/sl/revisions.jsonl" 2>/dev/null | wc -l) revisions written"
fi

echo; echo "== summary ($(( $(date +%s) - START )) s; logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
