#!/bin/bash
# Issue 15's GPU measurements as one prepared script for a lent GPU machine without network (see
# bench/README.md): the CUDA-graph equivalence test, then the seven stages against the book's script
# on GPT-2 small as the machine's image is, then again with Python's bytecode cached (as after a
# normal install), then optionally (XL=1) the gpt2-xl rows. Carry .whl/ (the wheels the image lacks)
# and .gpu/sms+spam+collection.zip. About 3 minutes on an H200 without XL, 6 with it.
# SMOKE=1: its steps on the CPU in seconds (what `make test` runs, tests/test_bench.py): the tests, then
# the first run as bench_stages.py --smoke (made-up data unless .gpu/ has the zip); not the bytecode-cached
# runs (the same command line, and a fresh PYTHONPYCACHEPREFIX would compile torch) nor XL's.
# Exits non-zero if any step failed (each runs even when one before it failed).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out} PY=${PY:-python3} MODEL=${MODEL:-gpt2-small} DEVICE=${DEVICE:-cuda}  # MODEL=tiny DEVICE=cpu: a dry run
SMOKE=${SMOKE:-0} DATA=$PWD/.gpu/sms+spam+collection.zip
mkdir -p "$OUT"
failed=0
step() {  # run a step; on failure say which, and carry on
  "$@" || { echo "FAILED (status $?): $*"; failed=1; }
}
if [ -d .whl ] && ! $PY -c "import pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site || exit 1
fi
SMOKE_FLAG=
if [ "$SMOKE" = 1 ]; then
  MODEL=tiny DEVICE=cpu SMOKE_FLAG=--smoke
fi
COMMON="--no-mlflow --no-dvc --device $DEVICE $SMOKE_FLAG"
if [ "$SMOKE" != 1 ] || [ -f "$DATA" ]; then
  COMMON="$COMMON --data $DATA"
fi
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
echo "=== tests/test_graphs.py (graphed training equals the eager loop, bit for bit)"
PYTHONPATH=$PWD/src:${PYTHONPATH:-} step timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_graphs.py -rs
echo "=== $MODEL, as the image is"
step timeout 150 $PY bench/bench_stages.py --model $MODEL --plain $COMMON --json "$OUT/small.json"
if [ "$SMOKE" = 1 ]; then
  exit $failed
fi
echo "=== $MODEL, bytecode cached (an untimed tiny run first compiles what the stages and the script import)"
cached() (  # a subshell: its settings stay in it
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=/tmp/pycache
  timeout 90 $PY bench/bench_stages.py --model tiny --plain $COMMON >/dev/null 2>&1
  timeout 100 $PY bench/bench_stages.py --model $MODEL --plain $COMMON --json "$OUT/small-cached.json"
)
step cached
if [ "${XL:-0}" = 1 ]; then
  echo "=== gpt2-xl rows, 1 epoch"
  step timeout 260 $PY bench/bench_stages.py --model gpt2-xl --epochs 1 $COMMON --variant last-block: \
    --variant all-layers:finetune.trainable_blocks=all --json "$OUT/xl.json"
fi
exit $failed
