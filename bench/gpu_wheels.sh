#!/usr/bin/env bash
# bench/gpu_wheels.sh: fill what bench/gpu.sh needs on the lent GPU machine, which has torch and
# transformers but neither DeepSpeed nor a network. Run it here (a machine with PyPI), in the
# checkout the device tool sends, then name both folders in the run's `carry` (bench/README.md):
#
#   .whl/        wheels for that machine's Python (3.12, x86-64): DeepSpeed at the version of
#                raytag's venv, built here (PyPI has only its source, which builds as pure
#                Python), and what it needs that the machine's image lacks: hjson, pydantic,
#                pydantic-core (compiled: a manylinux wheel), annotated-types, typing-inspection,
#                and typing-extensions (pydantic needs a recent one). Each at the venv's version,
#                one version of each. The image's own list: /work/.library/device/KINDS.md.
#   .gpu-data/   CoNLL-2003 (train, validation, test) and XLM-R's tokenizer, copied from ../shared,
#                which the device tool does not send.
#
# Both folders are git-ignored. Environment: PYTHON (the venv's python, .venv/bin/python),
# RAYTAG_WHEELS_PYTHON (the target's Python version, 3.12), RAYTAG_WHEEL_DIR (.whl),
# RAYTAG_GPU_DATA_DIR (.gpu-data).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
TARGET=${RAYTAG_WHEELS_PYTHON:-3.12}
WHEEL_DIR=${RAYTAG_WHEEL_DIR:-$ROOT/.whl}
DATA_DIR=${RAYTAG_GPU_DATA_DIR:-$ROOT/.gpu-data}
SHARED=$ROOT/../shared

say() { printf 'gpu_wheels.sh: %s\n' "$*"; }
[ -x "$PY" ] || {
    say "error: no $PY: run 'make install' first (or set PYTHON)" >&2
    exit 2
}

version() { "$PY" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$1"; }

rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"

# DeepSpeed: a source distribution only. Built with no C++ op (DS_BUILD_OPS=0; pip's isolated
# build has no torch anyway): an op is compiled on first use, if ever (raytag's optimizer is
# torch's AdamW), and DeepSpeed detects the accelerator when it runs.
DS=$(version deepspeed)
say "building deepspeed==$DS"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$WHEEL_DIR" "deepspeed==$DS"

# The rest: released wheels for the target's Python and platform.
pins=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    pins+=("$name==$(version "$name")")
done
say "downloading ${pins[*]} for CPython $TARGET, manylinux x86-64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${pins[@]}"

count=$(find "$WHEEL_DIR" -maxdepth 1 -type f -name '*.whl' | wc -l)
[ "$count" -eq 7 ] || {
    say "error: expected 7 wheels in $WHEEL_DIR, found $count" >&2
    exit 1
}

# The data and the tokenizer.
if [ -d "$SHARED/data/conll2003" ] && [ -d "$SHARED/models/xlm-roberta-base-tokenizer" ]; then
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR/conll2003"
    cp "$SHARED"/data/conll2003/{train,validation,test}.txt "$DATA_DIR/conll2003/"
    cp -r "$SHARED/models/xlm-roberta-base-tokenizer" "$DATA_DIR/"
else
    say "warning: no ../shared beside this checkout: $DATA_DIR not filled (gpu.sh then needs" \
        "RAYTAG_GPU_SH_DATA and RAYTAG_GPU_SH_TOKENIZER)" >&2
fi

ls -1 "$WHEEL_DIR" | sed 's/^/gpu_wheels.sh:   /'
du -sh "$WHEEL_DIR" "$DATA_DIR" 2>/dev/null | sed 's/^/gpu_wheels.sh: size /'
say "carry: [\".whl\", \".gpu-data\"] (the device tool's limit is 64 MiB with the working tree)"
