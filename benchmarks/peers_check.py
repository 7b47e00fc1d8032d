"""Proof with the peers' own code: our axolotl and DistillKit exports, loaded by axolotl's KD
dataset strategy (its PyPI release) and by DistillKit's offline loader (a source snapshot),
each in its own virtual environment, compared value by value with the store.

Steps: write a small chat store with the example teacher (``logitstore write``, ChatML,
top-16, fp32, assistant turns learned); export it with ``logitstore export --format axolotl
--messages`` and ``--format distillkit``; create the peer environments under ``--env-dir``
(pinned packages; see PEER_PACKAGES) unless they exist; run a child script in each that loads
the export with the peer's loader and saves what it produced; compare with the store:
tokens, candidate ids, probabilities (after the peer's renormalisation), masks. Results:
``results/peers.md`` and ``results/peers.json`` (with every command that was run).

DistillKit is not on PyPI: pass ``--distillkit-src`` pointing at a checkout of
github.com/arcee-ai/DistillKit outside this repository (none of its code is committed here).
``--quick`` writes and exports the store and checks the files with pyarrow only (no peer
environments): what tests/test_benchmarks.py runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib.report import REPO_ROOT, log, md_table, results_dir, run_meta, write_results

import logitstore

#: what each peer environment gets (axolotl 0.21.0 needs Python >= 3.12; its full dependency
#: set pulls CUDA kernels, xformers, bitsandbytes and more, none of which the KD dataset
#: strategy imports: we install axolotl without dependencies plus what the strategy imports)
PEER_PACKAGES = {
    "axolotl": [
        "torch==2.13.0",
        "transformers==5.20.1",
        "tokenizers==0.23.3",
        "datasets==5.0.1",
        "pydantic==2.13.5",
        "PyYAML==6.0.3",
        "pyarrow",
        "colorama",
        "addict",
        "peft==0.21.2",
    ],
    "axolotl-nodeps": ["axolotl==0.21.0"],
    "distillkit": [
        "torch==2.13.0",
        "trl~=0.25.1",
        "accelerate~=1.11.0",
        "transformers>=4.50.3",
        "datasets>=3.5.0",
        "pydantic~=2.12.4",
        "click~=8.3.0",
        "tqdm",
        "pyarrow",
        "pyyaml",
    ],
}

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "What does the os module do?"},
        {"role": "assistant", "content": "It gives access to the operating system."},
    ],
    [
        {"role": "system", "content": "Answer with code."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
        {"role": "user", "content": "And subtract them?"},
        {"role": "assistant", "content": "def sub(a, b):\n    return a - b\n"},
    ],
    [
        {"role": "user", "content": "Name a sorting function."},
        {"role": "assistant", "content": "sorted() returns a new sorted list."},
    ],
    [
        {"role": "user", "content": "How do I open a file?"},
        {"role": "assistant", "content": "with open(path) as f:\n    text = f.read()\n"},
    ],
]

AXOLOTL_CHILD = r"""
import json, sys
import datasets
from transformers import AutoTokenizer
from axolotl.utils.dict import DictDefault
from axolotl.integrations.kd.chat_template import load  # KDStrategyLoaderV2, "...kd.chat_template"
import axolotl

export, teacher, T, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(teacher)
cfg = DictDefault({"sequence_len": 4096, "train_on_inputs": False, "kd_temperature": T,
                   "chat_template": "tokenizer_default"})
ds_cfg = {"path": export, "type": "axolotl.integrations.kd.chat_template",
          "field_messages": "messages", "logprobs_field": "logprobs", "temperature": T,
          "roles_to_train": ["assistant"]}
strategy = load(tok, cfg, ds_cfg)
ds = datasets.load_dataset("parquet", data_files=export + "/data/*.parquet")["train"]
rows = []
for row in ds:
    r = strategy.tokenize_prompt(dict(row))
    rows.append({k: r[k] for k in ("input_ids", "labels", "target_token_ids", "target_logprobs",
                                    "target_mask")})
json.dump({"version": axolotl.__version__, "rows": rows}, open(out, "w"))
"""

DISTILLKIT_CHILD = r"""
import json, sys, yaml
src, export, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, src)
from distillkit.compression import LogprobCompressor
from distillkit.compression.config import DistributionQuantizationConfig
from distillkit.configuration import HfRepoDataset
from distillkit.main import _load_dataset, collate_packed_batch
from distillkit.signals import OfflineSignalSource

snippet = yaml.safe_load(open(export + "/distillkit.yaml"))
comp = snippet["teacher"]["logprob_compressor"]
source = OfflineSignalSource(
    LogprobCompressor(config=DistributionQuantizationConfig(**comp)), vocab_size=comp["d"]
)
ds = _load_dataset(HfRepoDataset(repo_id=export, split="train"), seed=None, num_samples=None,
                   tokenizer=None)
rows = []
for i in range(len(ds)):
    batch = collate_packed_batch([ds[i]])  # DistillKit's collator: one row, stacked
    sig = source.get_signal(batch)
    rows.append({"input_ids": batch["input_ids"][0].tolist(),
                 "kd_mask": (batch["labels"][0] >= 0).tolist(),
                 "ids": sig.sparse_ids[0].tolist(), "logprobs": sig.sparse_values[0].tolist(),
                 "log_values": sig.log_values, "T": sig.generation_temperature})
json.dump({"rows": rows}, open(out, "w"))
"""


def run(cmd: list[str], commands: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    commands.append(" ".join(str(c) for c in cmd))
    log("peers", f"$ {commands[-1]}")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {commands[-1]}\n{proc.stderr[-4000:]}")
    return proc


def make_store(work: Path, commands: list[str]) -> tuple[Path, Path, Path]:
    teacher = work / "teacher"
    shutil.copytree(REPO_ROOT / "examples" / "teacher", teacher, dirs_exist_ok=True)
    (teacher / "chat_template.jinja").write_text(CHATML)  # what AutoTokenizer reads
    convs = work / "conversations.jsonl"
    convs.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    store = work / "chat.zarr"
    cli = [sys.executable, "-m", "logitstore"]
    run([*cli, "write", "--teacher", teacher, "--data", convs, "--out", store,
         "--encoding", "topk", "--k", "16", "--values", "fp32", "--train-on", "assistant",
         "--overwrite", "--no-progress"], commands, cwd=REPO_ROOT)  # fmt: skip
    for fmt in ("axolotl", "distillkit"):
        extra = ["--messages", str(convs)] if fmt == "axolotl" else []
        proc = run([*cli, "export", store, "--format", fmt, "--out", work / fmt, *extra,
             "--overwrite", "--no-progress"], commands, cwd=REPO_ROOT)  # fmt: skip
        (work / fmt / "export-warnings.txt").write_text(
            "\n".join(x for x in proc.stderr.splitlines() if x.startswith("WARNING"))
        )
    return teacher, convs, store


def ensure_env(env: Path, python: str, groups: list[list[str]], commands: list[str]) -> Path:
    """The virtual environment at ``env``, created with ``groups`` of packages (the first with
    dependencies, the rest without) unless it exists; the commands that created it are kept
    in it and copied into the results either way."""
    py = env / "bin" / "python"
    record = env / "logitstore-peers-install.txt"
    if not py.exists():
        made: list[str] = []
        run([python, "-m", "venv", env], made)
        for i, pkgs in enumerate(groups):
            nodeps = ["--no-deps"] if i else []
            run([py, "-m", "pip", "install", "-q", *nodeps, *pkgs], made)
        record.write_text("\n".join(made) + "\n")
        commands += made
    else:
        made = record.read_text().splitlines() if record.exists() else ["(not recorded)"]
        commands.append(f"# reused {env}, which was created by:")
        commands += [f"#   {c}" for c in made]
    return py


def freeze(py: Path) -> list[str]:
    out = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    return out.split()


def compare(
    store: logitstore.StoreBase, ax: dict[str, Any] | None, dk: dict[str, Any] | None
) -> dict[str, Any]:
    """Max differences between what the peer's loader produced and the store."""
    out: dict[str, Any] = {}
    if ax is not None:
        tok_ok, ids_ok, dp = True, True, 0.0
        ours = theirs = both = both_shifted = 0
        for s, r in enumerate(ax["rows"]):
            b = store.sequence(s)
            tok_ok &= r["input_ids"] == b.input_ids.tolist()
            n = len(b.input_ids)
            ids = np.asarray(r["target_token_ids"])[-n:]
            lp = np.asarray(r["target_logprobs"], dtype=np.float64)[-n:]
            order = np.lexsort((b.ids, -b.probs), axis=-1)
            ids_ok &= bool(np.array_equal(ids, np.take_along_axis(b.ids, order, -1)))
            p = np.take_along_axis(b.probs, order, -1).astype(np.float64)
            renorm = p / p.sum(axis=1, keepdims=True)  # axolotl drops the residual
            dp = max(dp, float(np.abs(np.exp(lp) - renorm).max()))
            tmask = np.asarray(r["target_mask"])[-n:, 0].astype(bool)
            lm = b.loss_mask
            ours, theirs = ours + int(lm.sum()), theirs + int(tmask.sum())
            both += int((tmask & lm).sum())
            both_shifted += int((tmask[1:] & lm[:-1]).sum())
        out["axolotl"] = {
            "version": ax["version"],
            "same tokens as the store (its own chat-template tokenisation)": bool(tok_ok),
            "same candidate ids, same order": bool(ids_ok),
            "max abs(p_axolotl - p_store / sum p_store) (it renormalises the top-k)": dp,
            "positions the store's loss mask counts": ours,
            "positions axolotl's target_mask counts": theirs,
            "... counted by axolotl, not by the store": theirs - both,
            "... counted by the store, not by axolotl": ours - both,
            "... counted by axolotl where the store counts the position before": both_shifted,
        }
    if dk is not None:
        tok_ok, ids_ok, dlp, mask_ok = True, True, 0.0, True
        for s, r in enumerate(dk["rows"]):
            b = store.sequence(s)
            tok_ok &= r["input_ids"] == b.input_ids.tolist()
            order = np.lexsort((b.ids, -b.probs), axis=-1)
            ids_ok &= bool(
                np.array_equal(np.asarray(r["ids"]), np.take_along_axis(b.ids, order, -1))
            )
            p = np.take_along_axis(b.probs, order, -1).astype(np.float64)
            lp = np.asarray(r["logprobs"], dtype=np.float64)
            dlp = max(dlp, float(np.abs(np.exp(lp) - p).max()))
            mask_ok &= r["kd_mask"] == b.loss_mask.tolist()
        out["distillkit"] = {
            "same tokens": bool(tok_ok),
            "same candidate ids": bool(ids_ok),
            "max abs(exp(top_values) - p_store)": dlp,
            "KD mask (labels >= 0) == store loss_mask": bool(mask_ok),
            "values are log-probs at T": [dk["rows"][0]["log_values"], dk["rows"][0]["T"]],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="store + export + pyarrow checks only")
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: under --out)"
    )
    ap.add_argument(
        "--env-dir",
        type=Path,
        default=Path.home() / ".cache" / "logitstore-peers",
        help="where the peer virtual environments live (created if missing)",
    )
    ap.add_argument("--python312", default="python3.12", help="a Python >= 3.12 for axolotl 0.21.0")
    ap.add_argument(
        "--distillkit-src",
        type=Path,
        default=None,
        help="a DistillKit source checkout (outside this repository)",
    )
    args = ap.parse_args()
    out = args.out or results_dir(args.quick)
    # scratch stays out of the committed tree: out/ is git-ignored
    work = args.work or (out / "peers-work" if args.quick else REPO_ROOT / "out" / "peers-work")
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    t0 = time.time()
    teacher, _, store_path = make_store(work, commands)
    store = logitstore.open(store_path)
    import pyarrow.parquet as pq

    for fmt, cols in (
        ("axolotl", {"messages", "target_token_ids", "logprobs"}),
        ("distillkit", {"input_ids", "labels", "token_ids", "top_values"}),
    ):
        names = set(pq.read_schema(work / fmt / "data" / "train-00000-of-00001.parquet").names)
        assert cols <= names, f"{fmt} export lacks {cols - names}"
    warnings = {
        f: (work / f / "export-warnings.txt").read_text() for f in ("axolotl", "distillkit")
    }
    result: dict[str, Any] = {
        "store": str(store_path),
        "positions": len(store),
        "sequences": store.num_sequences,
        "k": store.encoding.k,
    }
    ax = dk = None
    if not args.quick:
        py = ensure_env(
            args.env_dir / "axolotl",
            args.python312,
            [PEER_PACKAGES["axolotl"], PEER_PACKAGES["axolotl-nodeps"]],
            commands,
        )
        child = work / "axolotl_child.py"
        child.write_text(textwrap.dedent(AXOLOTL_CHILD))
        run([py, child, work / "axolotl", teacher, str(store.encoding.temperature),
             work / "axolotl.json"], commands)  # fmt: skip
        ax = json.loads((work / "axolotl.json").read_text())
        result["axolotl_env"] = freeze(py)
        if args.distillkit_src is not None:
            src = args.distillkit_src.resolve()
            commit = (
                subprocess.run(
                    ["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
                or "(not a git checkout)"
            )
            result["distillkit_commit"] = commit
            py = ensure_env(
                args.env_dir / "distillkit", sys.executable, [PEER_PACKAGES["distillkit"]], commands
            )
            child = work / "distillkit_child.py"
            child.write_text(textwrap.dedent(DISTILLKIT_CHILD))
            run([py, child, src, work / "distillkit", work / "distillkit.json"], commands)
            dk = json.loads((work / "distillkit.json").read_text())
            result["distillkit_env"] = freeze(py)
    result["checks"] = compare(store, ax, dk)
    result["export_warnings"] = warnings
    result["commands"] = commands
    result["seconds"] = round(time.time() - t0, 1)
    rows = [[peer, check, str(v)] for peer, d in result["checks"].items() for check, v in d.items()]
    body = [
        f"Store: {result['sequences']} ChatML conversations, {result['positions']} positions, "
        f"top-{result['k']} fp32 (examples/teacher). DistillKit commit: "
        f"{result.get('distillkit_commit', 'not run')}.",
        "",
        *(md_table(["peer", "check", "result"], rows) if rows else ["(quick: no peer run)"]),
        "",
        "Masks. DistillKit's KD mask (labels >= 0 on row j) is the store's loss mask exactly. "
        "axolotl makes its own from its chat-template labels: target_mask[j] is set when "
        "token j is an assistant token, so the prediction of each turn's first token (made at "
        "the position before it, which the store counts) is not counted; and with this "
        "example tokenizer (no ChatML special tokens, eos <|endoftext|>) axolotl does not "
        "train the `<|im_end|>` text either (it warns: set `eot_tokens`), which the store "
        "counts as part of the assistant's turn.",
        "",
        "What `export` printed (axolotl; DistillKit's adds nothing for a T = 1 store):",
        "",
        *[f"    {line}" for line in warnings["axolotl"].splitlines()],
        "",
        "Commands run:",
        "",
        *[f"    {c}" for c in commands],
    ]
    write_results(
        out / "results" / "peers",
        "Our exports, loaded by the peers' own code",
        run_meta("peers_check.py", sys.argv[1:]),
        result,
        body,
    )
    log("peers", f"done in {result['seconds']} s")


if __name__ == "__main__":
    main()
