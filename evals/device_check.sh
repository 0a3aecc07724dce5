#!/usr/bin/env bash
# The device check: one script, at most 10 minutes on one GPU, that installs nothing beyond `make setup` and writes
# its results under $OUT (default ./device_check_out):
#
#   environment  nvidia-smi (where there is one), python / torch / CUDA versions  -> environment.log
#   pytest       the tests that exercise bf16, device selection and kronfluence  -> pytest.log
#   recipe       recipes/smollm2_default.yaml: on a GPU at 4x its size (synthesize.n_docs=192 select.k=16), on a
#                CPU at its normal size with one retraining seed                  -> recipe.log, recipe_results.json
#   bench_scale  evals/bench_scale.py at one size                                  -> bench_scale.{log,json,png}
#   summary.json every step's command, exit status and seconds (rewritten after each step)
#
#   bash evals/device_check.sh                    # GPU (or, without CUDA, the CPU variant of the same steps)
#   SIZE=small bash evals/device_check.sh         # CPU, for CI and tests: the tiny test model, about a minute
#
# Environment: SIZE (small | default), OUT (results), WORK (run folders; default $OUT/work, point it elsewhere where
# only a few files may come back from $OUT), PYTHON_BIN (an interpreter with infusion_lm installed; default .venv's,
# made with `make setup` when missing), BENCH_SIZE (documents for bench_scale; default 768 on a GPU, 48 on a CPU).
# On a machine without CUDA the GPU-relevant tests and the recipe run on the CPU. The script exits non-zero when a
# step failed; the steps after it still run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SIZE="${SIZE:-default}"
OUT="${OUT:-./device_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="${WORK:-$OUT/work}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1
export INFUSION_LM_CACHE="$WORK/cache"
STEPS="$WORK/steps.tsv"
: >"$STEPS"
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
T_START="$(date +%s.%N)"
FAILED=0
MODE="$SIZE"
PY="${PYTHON_BIN:-}"

case "$SIZE" in
  small|default) ;;
  *) echo "SIZE must be small or default, not $SIZE" >&2; exit 2 ;;
esac

summary() {  # summary.json from the steps so far (python3 where the project's interpreter is not there yet)
  local py="${PY:-python3}"
  [ -x "$py" ] || command -v "$py" >/dev/null 2>&1 || py=python3
  STEPS="$STEPS" OUT="$OUT" WORK="$WORK" SIZE="$SIZE" MODE="$MODE" STARTED="$STARTED" T_START="$T_START" \
    "$py" - <<'PYEOF'
import json, os, time
from pathlib import Path

steps = []
for line in Path(os.environ["STEPS"]).read_text().splitlines():
    name, status, seconds, command, note = (line.split("\t") + [""] * 5)[:5]
    rec = {"name": name, "command": command, "log": f"{name}.log"}
    if status == "skipped":
        rec.update(skipped=True, exit_status=None, seconds=0.0, reason=note)
    else:
        rec.update(exit_status=int(status), seconds=float(seconds), **({"note": note} if note else {}))
    steps.append(rec)
env = Path(os.environ["WORK"]) / "environment.json"
out = {"size": os.environ["SIZE"], "mode": os.environ["MODE"], "started": os.environ["STARTED"],
       "out": os.environ["OUT"], "work": os.environ["WORK"],
       "environment": json.loads(env.read_text()) if env.is_file() else None,
       "steps": steps, "ok": all(s["exit_status"] == 0 for s in steps if not s.get("skipped")),
       "total_seconds": round(time.time() - float(os.environ["T_START"]), 2)}
tmp = Path(os.environ["OUT"]) / ".summary.json.tmp"
tmp.write_text(json.dumps(out, indent=2) + "\n")
tmp.replace(Path(os.environ["OUT"]) / "summary.json")
PYEOF
}

step() {  # step NAME NOTE COMMAND...: runs COMMAND with its output in $OUT/NAME.log, records exit status and seconds
  local name="$1" note="$2"
  shift 2
  local rc=0 t0 t1
  echo "== $name: $*"
  t0="$(date +%s.%N)"
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  t1="$(date +%s.%N)"
  local cmd
  cmd="$(printf '%q ' "$@")"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')" "${cmd% }" \
    "$note" >>"$STEPS"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    echo "   $name failed (exit $rc); the last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
  summary
}

skip() {  # skip NAME REASON
  printf '%s\tskipped\t0\t\t%s\n' "$1" "$2" >>"$STEPS"
  echo "== $1: skipped ($2)"
  summary
}

# ------------------------------------------------------------------ the interpreter: the project's .venv, made by make setup
if [ -z "$PY" ]; then
  if [ ! -x .venv/bin/python ]; then
    step setup "make setup: .venv was missing" make setup
  fi
  PY="$ROOT/.venv/bin/python"
fi

environment() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || echo "nvidia-smi failed (exit $?)"
  else
    echo "nvidia-smi: not on this machine"
  fi
  "$PY" - "$WORK/environment.json" <<'PYEOF'
import json, platform, sys
import torch, transformers, kronfluence
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "transformers": transformers.__version__,
        "kronfluence": getattr(kronfluence, "__version__", "?"), "cpu_count": __import__("os").cpu_count()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info) + "\n")
PYEOF
}
step environment "" environment

CUDA=0
if [ -f "$WORK/environment.json" ] && grep -q '"cuda_available": true' "$WORK/environment.json"; then
  CUDA=1
fi
if [ "$SIZE" = default ]; then
  if [ "$CUDA" = 1 ]; then MODE=gpu; else MODE=cpu; fi
fi
summary

# ------------------------------------------------------------------ the model: the recipe's, or the tiny test model
if [ "$SIZE" = small ]; then
  MODEL="$WORK/tiny_model"
  tiny_model() {
    "$PY" - "$MODEL" <<'PYEOF'
import sys
sys.path.insert(0, "tests")
from tiny import tiny_model, tiny_tokenizer, toy_corpus, train_briefly
from infusion_lm.text.corpus import tokenize_documents
tok = tiny_tokenizer()
rows = tokenize_documents(tok, [{"text": t} for t in toy_corpus(32)], 64)
model = train_briefly(tiny_model(len(tok)), rows, tok.pad_token_id, steps=30)
model.save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
print("tiny model saved to", sys.argv[1])
PYEOF
  }
  step tiny_model "the tiny test model of tests/tiny.py" tiny_model
else
  MODEL="HuggingFaceTB/SmolLM2-135M-Instruct"
fi

# ------------------------------------------------------------------ the GPU-relevant tests (bf16, device selection, kronfluence)
if [ "$SIZE" = small ]; then
  step pytest "bf16 J, the cuda error, forward-mode J and kronfluence's scores (a subset)" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_audit.py tests/test_influence.py \
    -k "bf16 or cuda or forward_mode_J or reproduces_kronfluence"
else
  step pytest "every test of the files that exercise bf16, device selection and kronfluence" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_audit.py tests/test_influence.py tests/test_measurement.py \
    tests/test_models.py tests/test_engine_parity.py
fi

# ------------------------------------------------------------------ the default recipe
RECIPE_DIR="$WORK/recipe"
case "$MODE" in
  gpu) OVERRIDES=("synthesize.n_docs=192" "select.k=16") ;;   # 4x the recipe's 48 documents and k 4
  cpu) OVERRIDES=("retrain.seeds=[0]") ;;                      # its normal size; one retraining seed
  small) OVERRIDES=("model=$MODEL" "influence.layers=[1]" "synthesize.n_docs=12" "synthesize.max_new_tokens=32"
                    "select.k=2" "retrain.seeds=[0]" "evaluate.bootstrap_samples=100"
                    "measurement.heldout_corpus=null") ;;  # the tiny model's own stories never say "dog"
esac
recipe() {
  # (set -e does not reach inside a function called from `step`'s `||`: each command returns its own failure)
  "$PY" -m infusion_lm run recipes/smollm2_default.yaml "output_dir=$RECIPE_DIR" "${OVERRIDES[@]}" --quiet --force \
    || return $?
  cp "$RECIPE_DIR/results.json" "$OUT/recipe_results.json" || return $?
}
if [ "${SKIP_RECIPE:-0}" = 1 ]; then
  skip recipe "SKIP_RECIPE=1"
else
  step recipe "mode $MODE: ${OVERRIDES[*]}" recipe
fi

# ------------------------------------------------------------------ bench_scale at one size
if [ "$MODE" = small ]; then
  BENCH=(--model "$MODEL" --layers 1 --sizes "${BENCH_SIZE:-12}" --tokens 32 --lengths --first_step pool)
elif [ "$MODE" = gpu ]; then
  BENCH=(--sizes "${BENCH_SIZE:-768}" --tokens 64 --lengths)
else
  BENCH=(--sizes "${BENCH_SIZE:-48}" --tokens 64 --lengths)
fi
step bench_scale "one size" "$PY" evals/bench_scale.py "${BENCH[@]}" --work_dir "$WORK/bench_scale" \
  --out "$OUT/bench_scale.json"

summary
echo "summary: $OUT/summary.json"
if [ "$FAILED" -ne 0 ]; then
  echo "device check: a step failed (see summary.json)" >&2
  exit 1
fi
echo "device check: every step passed"
