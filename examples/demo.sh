#!/usr/bin/env bash
# The built-in default, end to end, with no network and no GPU:
#   1. set up .venv (same set-up as the tests),
#   2. take Python standard-library files the shipped teacher never saw as sample text
#      (listed in examples/teacher/held_out.txt; examples/held_out.py reads them),
#   3. run the shipped small teacher (examples/teacher, trained by benchmarks/teacher.py)
#      over it and write a top-64 u8 store,
#   4. print what the store holds, verify it, and show what the teacher thought at a position,
#   5. serve both stores over HTTP (logitstore serve, on 127.0.0.1) and train a small student
#      from them over the network (examples/train_student.py), reporting held-out perplexity
#      and KL to the teacher on the second store, of other held-out files,
#   6. hard labels: the teacher completes prompts (the start of each training file) into a
#      store with a loss mask over the completions, exported as JSON lines,
#   7. co-distillation: the teacher keeps training beside a new student for a few steps,
#      recording its distributions over the evaluation text into a store.
# Output goes to out/demo (override with OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
out=${OUT:-out/demo}
mkdir -p "$out"
py=.venv/bin/python
cli=.venv/bin/logitstore

$py examples/held_out.py --out "$out/sample.jsonl" --max-docs 28
head -n 24 "$out/sample.jsonl" > "$out/train.jsonl"
tail -n 4 "$out/sample.jsonl" > "$out/eval.jsonl"
for split in train eval; do
  store=$([ $split = train ] && echo teacher || echo eval)
  $cli write --teacher examples/teacher --data "$out/$split.jsonl" --out "$out/$store.zarr" \
    --encoding topk --k 64 --values u8 --seq-len 256 --batch-size 8 --device cpu --overwrite
done
echo
$cli info "$out/teacher.zarr"
echo
$cli verify "$out/teacher.zarr" --no-progress
echo
$cli show "$out/teacher.zarr" --position 1000 --top 8
echo
port=${PORT:-8765}
$cli serve "$out/teacher.zarr" "$out/eval.zarr" --port "$port" &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 100); do  # wait until it answers
  $py -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/v1/health')" 2>/dev/null && break
  sleep 0.1
done
rm -rf "$out/student"
$py examples/train_student.py --store "http://127.0.0.1:$port/v1/stores/teacher.zarr" \
  --eval-store "http://127.0.0.1:$port/v1/stores/eval.zarr" \
  --out "$out/student" --steps 300 --eval-every 100
echo
# 6. Hard labels: the prompts are the first 160 characters of each training document.
$py -c '
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        out.write(json.dumps({"prompt": json.loads(line)["text"][:160]}) + "\n")
' "$out/train.jsonl" "$out/prompts.jsonl"
$cli generate --teacher examples/teacher --prompts "$out/prompts.jsonl" --out "$out/generated.zarr" \
  --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --num-samples 2 --stop $'\n\n\n' \
  --batch-size 16 --device cpu --overwrite
echo
$cli info "$out/generated.zarr"
$cli export "$out/generated.zarr" --jsonl --out "$out/generated.jsonl"
$py -c '
import json, sys
r = json.loads(open(sys.argv[1]).readline())
print("first completion:", repr(r["completion"][:160]), "| finish:", r["finish_reason"])
' "$out/generated.jsonl"
echo
# 7. Co-distillation: 40 steps, recording the teacher's distributions at the end.
rm -rf "$out/codistill"
$py examples/codistill.py --data "$out/train.jsonl" --eval-data "$out/eval.jsonl" \
  --out "$out/codistill" --steps 40 --record-every 40 --no-progress
$cli info "$out/codistill/records/teacher-step000040.zarr" | head -n 4
