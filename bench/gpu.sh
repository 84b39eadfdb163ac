#!/usr/bin/env bash
# bench/gpu.sh: raytag's GPU check, one prepared script for a lent GPU machine (bench/README.md).
#
#   1. DeepSpeed and the packages it needs, from the wheels in .whl/ (bench/gpu_wheels.sh fills
#      it on a machine with PyPI), when torch sees a GPU and cannot import deepspeed: the lent
#      machine has torch and transformers but no DeepSpeed, and no network.
#   2. The `gpu` tests (tests/test_gpu.py) under pytest.
#   3. bf16 training runs, one worker in this machine's process, at ZeRO-0 and at ZeRO-2:
#      xlm-roberta-base's architecture, randomly initialised (`builtin:xlmr-base-random`), three
#      epochs of CoNLL-2003 plus evaluation, with XLM-R's tokenizer and the recipe of
#      configs/xlmr-base-conll2003.yaml. Each prints train tokens/s, MFU, train seconds, wall time
#      and peak GPU memory (bench/gpu_run.py), prefixed by its stage ("ZeRO-0: ...").
#   4. The Hugging Face Trainer recipe (run_ner's, batch 8, --bf16) on the same data, model and
#      device, one epoch plus evaluation (bench/gpu_hf.py), and raytag's tokens/s over its.
#      Skipped, saying why, when the Trainer's `accelerate` is missing.
#
# Without a GPU, steps 1 and 2 are skipped (it says so) and steps 3 and 4 run on the CPU, which
# only makes sense with RAYTAG_GPU_SH_TINY=1 (tests/test_gpu_sh.py does that).
#
# Environment (all optional):
#   RAYTAG_GPU_SH_TINY=1         the demo's tiny model and data, a few steps: a rehearsal
#   RAYTAG_GPU_SH_PYTHON         the Python to run (python3; on the lent machine, the one with torch)
#   RAYTAG_GPU_SH_DATA           a folder with CoNLL-2003's train.txt, validation.txt, test.txt
#                                (default: .gpu-data/conll2003, else ../shared/data/conll2003)
#   RAYTAG_GPU_SH_TOKENIZER      XLM-R's tokenizer folder (default: .gpu-data/xlm-roberta-base-tokenizer,
#                                else ../shared/models/xlm-roberta-base-tokenizer)
#   RAYTAG_GPU_SH_EPOCHS         epochs of the full runs (3)
#   RAYTAG_GPU_SH_ZERO           the ZeRO stages to run ("0 2")
#   RAYTAG_GPU_SH_HF_EPOCHS      epochs of the Hugging Face Trainer run (1; its tokens/s is the figure)
#   RAYTAG_GPU_SH_MAX_STEPS      cap on optimizer steps (the tiny run: 4)
#   RAYTAG_GPU_SH_BATCH_TOKENS   train.batch_tokens (default: the config's, 1024: the recipe's)
#   RAYTAG_GPU_SH_ARGS           more raytag key=value overrides, space-separated
#   RAYTAG_GPU_SH_OUT            where the figures and logs go (default: $OUT on the lent machine,
#                                else bench/out/gpu): per stage gpu-summary-zeroN.json,
#                                results-zeroN.json, metrics-zeroN.jsonl, run-zeroN.log; hf-summary.json,
#                                hf.log, pytest.log (small files)
#   RAYTAG_GPU_SH_RUNS           where the run's folder goes (default: $TMPDIR or /tmp, /raytag-gpu-sh):
#                                checkpoints and the exported model are GBs, kept out of $OUT
#   RAYTAG_GPU_SH_WHEELS         auto (step 1 as above), always (install even without a GPU), never
#   RAYTAG_GPU_SH_WHEEL_DIR      the wheels (default: .whl)
#   RAYTAG_GPU_SH_SITE           where step 1 installs them (default: /tmp/site, put on PYTHONPATH)
#   RAYTAG_GPU_SH_SKIP_TESTS=1   skip step 2
#
# Exit status: 0 when the tests passed (or were skipped) and the run finished; 1 when either
# failed (step 3 still runs after failed tests); 2 when something it needs is missing.

set -uo pipefail # not -e: a failed test must not stop the run; each step's status is kept

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

say() { printf 'gpu.sh: %s\n' "$*"; }
die() {
    say "error: $*" >&2
    exit 2
}

PY=${RAYTAG_GPU_SH_PYTHON:-python3}
TINY=${RAYTAG_GPU_SH_TINY:-0}
OUTDIR=${RAYTAG_GPU_SH_OUT:-${OUT:-$ROOT/bench/out/gpu}}
RUNS=${RAYTAG_GPU_SH_RUNS:-${TMPDIR:-/tmp}/raytag-gpu-sh}
WHEELS=${RAYTAG_GPU_SH_WHEELS:-auto}
WHEEL_DIR=${RAYTAG_GPU_SH_WHEEL_DIR:-$ROOT/.whl}
SITE=${RAYTAG_GPU_SH_SITE:-/tmp/site}
mkdir -p "$OUTDIR" "$RUNS" || die "cannot create $OUTDIR or $RUNS"

# One process, never Ray: the run must not join a cluster or inherit another launcher's ranks.
unset RAY_ADDRESS RAY_JOB_ID RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT
# DeepSpeed's accelerator is chosen by raytag (cuda when torch sees a GPU); the Makefile's cpu
# setting, if inherited, would keep a GPU idle.
unset DS_ACCELERATOR
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

# ---- 0. the machine
command -v "$PY" >/dev/null || die "no $PY (set RAYTAG_GPU_SH_PYTHON)"
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    GPU=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        sed 's/^/gpu.sh: nvidia-smi: /'
else
    GPU=0
fi
"$PY" -c 'import sys, torch; print("gpu.sh: python", sys.version.split()[0], "torch", torch.__version__,
    "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
if [ "$GPU" = 0 ] && [ "$WHEELS" = auto ]; then
    say "no GPU (torch.cuda.is_available() is false): skipping the wheel install and the gpu tests"
elif [ "$GPU" = 0 ]; then
    say "no GPU (torch.cuda.is_available() is false): skipping the gpu tests"
fi

# ---- 1. DeepSpeed and its needs from carried wheels
case $WHEELS in
auto) if [ "$GPU" = 1 ] && ! "$PY" -c 'import deepspeed' 2>/dev/null; then INSTALL=1; else INSTALL=0; fi ;;
always) INSTALL=1 ;;
never) INSTALL=0 ;;
*) die "RAYTAG_GPU_SH_WHEELS=$WHEELS: expected auto, always or never" ;;
esac
if [ "$INSTALL" = 1 ]; then
    shopt -s nullglob
    wheels=("$WHEEL_DIR"/*.whl)
    shopt -u nullglob
    [ ${#wheels[@]} -gt 0 ] || die "$PY cannot import deepspeed and $WHEEL_DIR holds no wheels: run" \
        "'bash bench/gpu_wheels.sh' on a machine with PyPI access and carry .whl (bench/README.md)"
    say "step 1: installing ${#wheels[@]} wheels from $WHEEL_DIR into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" || die "pip could not install the wheels of $WHEEL_DIR"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$GPU" = 1 ]; then
    say "step 1: deepspeed is importable already: no wheels installed"
fi
"$PY" -c 'import deepspeed' 2>/dev/null || die "$PY cannot import deepspeed"

# raytag from this checkout when it is not installed (the lent machine): a folder of links that
# gives the checkout's folders their installed names (raytag.trainer, ...), as pyproject maps them.
if ! "$PY" -c 'import raytag.trainer' 2>/dev/null; then
    LINKS="$RUNS/raytag-links"
    rm -rf "$LINKS" && mkdir -p "$LINKS/raytag" || die "cannot create $LINKS"
    for d in trainer launcher cluster; do ln -s "$ROOT/$d" "$LINKS/raytag/$d"; done
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
    say "raytag is not installed for $PY: importing this checkout's folders through $LINKS"
fi
"$PY" -c 'import deepspeed, raytag.trainer.engine; print("gpu.sh: deepspeed", deepspeed.__version__)' ||
    die "$PY cannot import raytag and deepspeed together"

# ---- 2. the gpu tests
TESTS=skipped
if [ "$GPU" = 1 ] && [ "${RAYTAG_GPU_SH_SKIP_TESTS:-0}" != 1 ]; then
    say "step 2: pytest tests/test_gpu.py"
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUTDIR/pytest.log"
    if [ "${PIPESTATUS[0]}" = 0 ]; then TESTS=passed; else TESTS=failed; fi
else
    say "step 2: gpu tests skipped"
fi

# ---- 3. the bf16 run
USE_GPU=false
[ "$GPU" = 1 ] && USE_GPU=true
if [ "$TINY" = 1 ]; then
    CONFIG=configs/demo.yaml
    NAME=gpu-sh-tiny
    OVERRIDES=(model.name_or_path=builtin:tiny-xlmr "train.max_steps=${RAYTAG_GPU_SH_MAX_STEPS:-4}" train.log_every=2)
else
    if [ "$GPU" = 0 ] && [ -z "${RAYTAG_GPU_SH_MAX_STEPS:-}" ]; then
        die "no GPU: an epoch of xlm-roberta-base on the CPU takes hours; set RAYTAG_GPU_SH_TINY=1" \
            "(or RAYTAG_GPU_SH_MAX_STEPS) for a rehearsal"
    fi
    find_dir() { # the first folder that holds $1
        local file=$1
        shift
        for d in "$@"; do [ -n "$d" ] && [ -f "$d/$file" ] && (cd "$d" && pwd) && return 0; done
        return 1
    }
    DATA=$(find_dir train.txt "${RAYTAG_GPU_SH_DATA:-}" .gpu-data/conll2003 ../shared/data/conll2003) ||
        die "no CoNLL-2003 folder (train.txt, validation.txt, test.txt): set RAYTAG_GPU_SH_DATA, or run" \
            "'bash bench/gpu_wheels.sh' where ../shared exists and carry .gpu-data"
    TOKENIZER=$(find_dir tokenizer.json "${RAYTAG_GPU_SH_TOKENIZER:-}" .gpu-data/xlm-roberta-base-tokenizer \
        ../shared/models/xlm-roberta-base-tokenizer) ||
        die "no XLM-R tokenizer folder: set RAYTAG_GPU_SH_TOKENIZER, or carry .gpu-data (bench/gpu_wheels.sh)"
    CONFIG=configs/xlmr-base-conll2003.yaml
    NAME=xlmr-base-random-conll2003
    OVERRIDES=(
        "data.train=$DATA/train.txt" "data.validation=$DATA/validation.txt" "data.test=$DATA/test.txt"
        "model.name_or_path=builtin:xlmr-base-random:$TOKENIZER" "train.epochs=${RAYTAG_GPU_SH_EPOCHS:-3}"
    )
    [ -n "${RAYTAG_GPU_SH_MAX_STEPS:-}" ] && OVERRIDES+=("train.max_steps=$RAYTAG_GPU_SH_MAX_STEPS")
fi
[ -n "${RAYTAG_GPU_SH_BATCH_TOKENS:-}" ] && OVERRIDES+=("train.batch_tokens=$RAYTAG_GPU_SH_BATCH_TOKENS")
OVERRIDES+=(train.precision=bf16 "run.storage=$RUNS/runs" run.new_run=true
    scaling.num_workers=1 "scaling.use_gpu=$USE_GPU")
read -r -a EXTRA <<<"${RAYTAG_GPU_SH_ARGS:-}"
OVERRIDES+=("${EXTRA[@]}")

RUN=finished
FIRST_SUMMARY=
for Z in ${RAYTAG_GPU_SH_ZERO:-0 2}; do
    STAGE=("run.name=$NAME-zero$Z")
    # One worker runs ZeRO-0 unless DeepSpeed's JSON names the stage (trainer/engine.py, engine_spec).
    [ "$Z" != 0 ] && STAGE+=("train.deepspeed={zero_optimization: {stage: $Z}}")
    say "step 3: bf16 run at ZeRO-$Z of $CONFIG ${OVERRIDES[*]} ${STAGE[*]}"
    "$PY" bench/gpu_run.py --label "ZeRO-$Z" --config "$CONFIG" --summary "$OUTDIR/gpu-summary-zero$Z.json" \
        "${OVERRIDES[@]}" "${STAGE[@]}" 2>&1 | tee "$OUTDIR/run-zero$Z.log"
    [ "${PIPESTATUS[0]}" = 0 ] || RUN=failed
    [ -z "$FIRST_SUMMARY" ] && [ -f "$OUTDIR/gpu-summary-zero$Z.json" ] && FIRST_SUMMARY="$OUTDIR/gpu-summary-zero$Z.json"
    [ -f "$RUNS/runs/$NAME-zero$Z/results.json" ] && cp "$RUNS/runs/$NAME-zero$Z/results.json" "$OUTDIR/results-zero$Z.json"
    [ -f "$RUNS/runs/$NAME-zero$Z/metrics.jsonl" ] && cp "$RUNS/runs/$NAME-zero$Z/metrics.jsonl" "$OUTDIR/metrics-zero$Z.jsonl"
done

# ---- 4. the Hugging Face Trainer recipe on the same data, model and device
HF=skipped
if ! "$PY" -c 'import accelerate' 2>/dev/null; then
    say "step 4: HF Trainer skipped: $PY cannot import accelerate (the Trainer needs it)"
else
    if [ "$TINY" = 1 ]; then
        HF_ARGS=(--model builtin:tiny-xlmr --data trainer/assets/demo --max-steps "${RAYTAG_GPU_SH_MAX_STEPS:-4}")
    else
        HF_ARGS=(--model "builtin:xlmr-base-random:$TOKENIZER" --data "$DATA" --epochs "${RAYTAG_GPU_SH_HF_EPOCHS:-1}")
    fi
    say "step 4: HF Trainer recipe, bf16: ${HF_ARGS[*]}"
    "$PY" bench/gpu_hf.py --summary "$OUTDIR/hf-summary.json" --bf16 "${HF_ARGS[@]}" 2>&1 | tee "$OUTDIR/hf.log"
    if [ "${PIPESTATUS[0]}" = 0 ]; then HF=finished; else HF=failed; fi
    if [ "$HF" = finished ] && [ -n "$FIRST_SUMMARY" ]; then
        "$PY" - "$FIRST_SUMMARY" "$OUTDIR/hf-summary.json" <<'PY'
import json, sys
rt, hf = (json.load(open(p)) for p in sys.argv[1:3])
ratio = rt["train_tokens_per_second"] / hf["train_tokens_per_second"]
print(f"gpu.sh: raytag/HF Trainer train tokens/s: {ratio:.2f}")
PY
    fi
fi

say "total seconds: $SECONDS"
say "done: gpu tests $TESTS, runs $RUN, HF Trainer $HF; figures and logs in $OUTDIR"
[ "$TESTS" != failed ] && [ "$RUN" = finished ] && [ "$HF" != failed ]
