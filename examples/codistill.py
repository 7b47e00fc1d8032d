"""Co-distillation: a teacher and a student train together on the same batches of text.

    python examples/codistill.py --data out/demo/train.jsonl --eval-data out/demo/eval.jsonl

The teacher (initialised from ``--teacher``, a Hugging Face model directory, and trained on
ground-truth cross-entropy) and a small student (trained on ``alpha(step) · KL(teacher ‖
student) + (1 − alpha(step)) · CE`` against the teacher's detached logits) step together.
``--out`` holds ``checkpoint.pt`` (both models, both optimizers, LR schedules, RNG state) and
``log.jsonl``; rerunning the same command resumes, and a resumed run logs the same losses
bit for bit as an uninterrupted one. With ``--record-every N`` the teacher's distributions
over the evaluation text are written into ``--out/records/teacher-stepNNNNNN.zarr`` every N
steps and at the end, so later students can distil from them without the teacher. At the
end both models are saved (``--out/teacher``, ``--out/student``) and their held-out
cross-entropy is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import logitstore
from logitstore import Encoding, losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, nargs="+", help=".txt or .jsonl training text")
    p.add_argument("--eval-data", nargs="+", help="held-out text for evaluation and records")
    p.add_argument(
        "--teacher",
        default=str(Path(__file__).parent / "teacher"),
        help="Hugging Face model directory the teacher starts from (default: the shipped "
        "examples/teacher); its tokenizer tokenises the text",
    )
    p.add_argument("--out", default="out/codistill", help="run directory (default out/codistill)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    p.add_argument("--teacher-lr", type=float, default=3e-4, help="teacher learning rate")
    p.add_argument("--alpha", type=float, default=0.5, help="final weight of KD against CE")
    p.add_argument(
        "--schedule",
        choices=losses.SCHEDULES,
        default="linear",
        help="how alpha reaches --alpha (default linear: trust the teacher gradually)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    p.add_argument("--layers", type=int, default=2, help="student layers")
    p.add_argument("--embd", type=int, default=96, help="student width")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument(
        "--record-every",
        type=int,
        default=None,
        help="record the teacher's distributions over --eval-data every N steps (and at the "
        "end) into --out/records",
    )
    p.add_argument("--record-k", type=int, default=64, help="top-k of the records (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="checkpoint and exit after this step; rerun the command to continue",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_student(vocab: int, eos: int, args: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    cfg = GPT2Config(  # no dropout: a resumed run then matches an uninterrupted one exactly
        vocab_size=vocab,
        n_positions=args.seq_len,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=max(1, args.embd // 32),
        bos_token_id=eos,
        eos_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def lr_lambda(steps: int) -> object:
    """20 steps of linear warm-up, then cosine decay to 0 at ``steps`` (a factor of the lr)."""
    return lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


@torch.no_grad()
def held_out_ce(model: torch.nn.Module, seqs: logitstore.Sequences, seq_len: int) -> float:
    model.eval()
    total = count = 0.0
    for a, b in zip(seqs.offsets[:-1], seqs.offsets[1:], strict=True):
        for s in range(int(a), int(b) - 1, seq_len - 1):
            e = min(s + seq_len, int(b))
            ids = torch.from_numpy(seqs.input_ids[s:e])[None].to(next(model.parameters()).device)
            logits = model(input_ids=ids).logits[:, :-1]
            total += float(losses.cross_entropy(logits, ids[:, 1:], reduction="sum"))
            count += e - s - 1
    model.train()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    # float32 weights: both models train (optimizer updates vanish in 16-bit weights)
    teacher_info = logitstore.load_teacher(args.teacher, args.device, "float32")
    device = teacher_info.device
    tokenizer, teacher = teacher_info.tokenizer, teacher_info.model
    for module in teacher.modules():  # dropout off: exact resume
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    vocab = teacher_info.vocab_size
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    student = make_student(vocab, eos, args).to(device)
    seq_len = min(args.seq_len, teacher_info.max_length or args.seq_len)
    train = logitstore.tokenize(logitstore.read_documents(args.data), tokenizer, None)
    held = (
        logitstore.tokenize(logitstore.read_documents(args.eval_data), tokenizer, seq_len)
        if args.eval_data
        else None
    )
    t_opt = torch.optim.AdamW(teacher.parameters(), lr=args.teacher_lr, weight_decay=0.1)
    s_opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.1)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))  # type: ignore[arg-type]
        for opt in (t_opt, s_opt)
    ]
    record = None
    if args.record_every is not None:
        if held is None:
            print("--record-every needs --eval-data (the text to record)", file=sys.stderr)
            return 2
        record = logitstore.Recording(
            held,
            out / "records",
            Encoding("topk", "u8", k=args.record_k),
            every=args.record_every,
            tokenizer=tokenizer,
        )
    checkpoint = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    resumed_at = 0
    if checkpoint.exists():
        resumed_at = int(torch.load(checkpoint, weights_only=True)["step"])
        # Steps logged after the checkpoint are run again: drop them from the log.
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        log_path.write_text("".join(f"{x}\n" for x in lines[:resumed_at]))
        print(f"resuming at step {resumed_at}", file=sys.stderr)
    elif log_path.exists():
        log_path.unlink()
    with log_path.open("a") as log:

        def on_step(r: logitstore.CodistillStep) -> None:
            row = {
                "step": r.step + 1,
                "alpha": r.alpha,
                "teacher_ce": r.teacher_ce,
                "student_ce": r.student_ce,
                "student_kd": r.student_kd,
            }
            log.write(json.dumps(row) + "\n")
            log.flush()

        logitstore.codistill(
            teacher,
            student,
            t_opt,
            s_opt,
            logitstore.window_batches(train, args.batch_size, seq_len, args.seed),
            args.steps,
            alpha=losses.alpha_schedule(args.schedule, args.alpha, args.steps),
            temperature=args.temperature,
            schedulers=schedulers,
            checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every,
            record=record,
            stop_after=args.stop_at,
            on_step=on_step,
            progress=not args.no_progress,
        )
    if args.stop_at is not None and args.stop_at < args.steps:
        print(f"stopped after step {args.stop_at}; rerun to continue", file=sys.stderr)
        return 0
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    student.save_pretrained(out / "student")
    summary: dict[str, float | int] = {"steps": args.steps}
    if held is not None:
        summary["teacher_held_out_ce"] = held_out_ce(teacher, held, seq_len)
        summary["student_held_out_ce"] = held_out_ce(student, held, seq_len)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
