#!/usr/bin/env bash
# The built-in default, end to end, with no network and no GPU:
#   1. set up .venv (same set-up as the tests),
#   2. take held-out Python standard-library files as sample text,
#   3. run the shipped small teacher (examples/teacher, trained by benchmarks/teacher.py)
#      over it and write a top-64 u8 store,
#   4. print what the store holds, verify it, and show what the teacher thought at a position.
# Output goes to out/demo (override with OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
out=${OUT:-out/demo}
mkdir -p "$out"
py=.venv/bin/python
cli=.venv/bin/logitstore

$py benchmarks/teacher.py --export-held-out "$out/sample.jsonl" --max-docs 24
$cli write --teacher examples/teacher --data "$out/sample.jsonl" --out "$out/teacher.zarr" \
  --encoding topk --k 64 --values u8 --seq-len 256 --batch-size 8 --device cpu --overwrite
echo
$cli info "$out/teacher.zarr"
echo
$cli verify "$out/teacher.zarr" --no-progress
echo
$cli show "$out/teacher.zarr" --position 1000 --top 8
