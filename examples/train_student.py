"""Train a small student from a logitstore store: the loop a distillation run needs, and no more.

    python examples/train_student.py --store out/demo/teacher.zarr --eval-store out/demo/eval.zarr

Loss: ``alpha(step) · KD + (1 − alpha(step)) · CE`` (``--alpha 1`` is pure distillation,
``--alpha 0`` plain cross-entropy on the data). KD is the forward KL to the stored teacher
with its residual bucket (or ``--kd reverse``). Every ``--eval-every`` steps it reports held-out
cross-entropy (perplexity) and KL to the teacher. ``--out`` holds ``checkpoint.pt`` (model,
optimizer, data-loader position, step); rerunning the same command resumes from it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import logitstore
from logitstore import losses

# torchdata 0.11 calls a torch API that torch 2.13 deprecates; harmless.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--store",
        required=True,
        help="training store: a directory or an http(s):// URL (any encoding)",
    )
    p.add_argument("--eval-store", help="held-out store for perplexity and KL (default: none)")
    p.add_argument(
        "--out", default="out/student", help="checkpoint directory (default out/student)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of KD against CE (default 1)")
    p.add_argument(
        "--schedule",
        choices=losses.SCHEDULES,
        default="constant",
        help="how alpha reaches --alpha: constant, or linear/cosine ramps over --steps",
    )
    p.add_argument("--kd", choices=["forward", "reverse"], default="forward")
    p.add_argument("--temperature", type=float, default=1.0, help="student temperature for KD")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=96)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="checkpoint and exit at this step (e.g. to fit a job's time limit); "
        "rerun the command to continue",
    )
    return p.parse_args(argv)


def make_student(vocab: int, args: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    # No dropout: small data, and a resumed run then matches an uninterrupted one exactly.
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=args.seq_len,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=max(1, args.embd // 32),
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def loader_for(store: str, args: argparse.Namespace, shuffle: bool) -> StatefulDataLoader:
    ds = logitstore.LogitDataset(store, seq_len=args.seq_len, shuffle=shuffle, seed=args.seed)
    return StatefulDataLoader(
        ds, batch_size=args.batch_size, num_workers=args.workers, collate_fn=logitstore.collate
    )


def kd_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], args: argparse.Namespace
) -> torch.Tensor:
    fn = losses.forward_kl if args.kd == "forward" else losses.reverse_kl
    targets = (batch["ids"], batch["probs"], batch["residual"], batch["loss_mask"])
    return fn(logits, *targets, temperature=args.temperature)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """20 steps of linear warm-up, then cosine decay to 0 at --steps."""
    warmup = min(1.0, (step + 1) / 20)
    return args.lr * warmup * 0.5 * (1 + math.cos(math.pi * step / args.steps))


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, store: str, args: argparse.Namespace) -> dict[str, float]:
    """Held-out cross-entropy on the data (and its perplexity), and KL to the teacher."""
    model.eval()
    ce_sum = kl_sum = ce_tokens = kl_tokens = 0.0
    for batch in loader_for(store, args, shuffle=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce_sum += losses.cross_entropy(logits, batch["labels"], reduction="sum").item()
        ce_tokens += (batch["labels"] >= 0).sum().item()
        if batch["ids"].shape[-1] > 0:  # a store with distributions
            targets = (batch["ids"], batch["probs"], batch["residual"], batch["loss_mask"])
            kl_sum += losses.forward_kl(logits, *targets, reduction="sum").item()  # at T = 1
            kl_tokens += batch["loss_mask"].sum().item()
    model.train()
    ce = ce_sum / max(ce_tokens, 1)
    kl = kl_sum / kl_tokens if kl_tokens else float("nan")
    return {"eval_ce": ce, "eval_ppl": math.exp(ce), "eval_kl": kl}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = logitstore.open(args.store)
    if args.kd == "reverse" and store.encoding.kind == "sampled":
        sys.exit(
            "--kd reverse needs a topk or full store: a sampled store's zero residual "
            "would penalise every token that was not drawn"
        )
    if store.encoding.kind == "none" and args.alpha > 0:
        sys.exit(
            f"{args.store} holds tokens only (hard labels, e.g. from `logitstore generate`), "
            "no teacher distributions to distil from: train on it with --alpha 0"
        )
    model = make_student(store.vocab_size, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    alpha = losses.alpha_schedule(args.schedule, args.alpha, args.steps)
    loader = loader_for(args.store, args, shuffle=True)
    step = epoch = 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume: model, optimizer, data position, step
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        loader.dataset.set_epoch(epoch)
        loader.load_state_dict(state["loader"])
        print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    print(
        f"student: {sum(p.numel() for p in model.parameters()):,} params; teacher store: "
        f"{store.encoding.kind} {store.encoding.values}, {len(store):,} positions",
        file=sys.stderr,
    )
    log = (out / "log.jsonl").open("a")
    model.train()
    t0, first_step = time.perf_counter(), step  # tokens/s counts this run's steps only
    while step < args.steps:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # (B, T, V)
            a = alpha(step)
            ce = losses.cross_entropy(logits, batch["labels"])
            kd = kd_loss(logits, batch, args) if a > 0 else torch.zeros(())
            loss = a * kd + (1 - a) * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            record = {
                "step": step,
                "loss": loss.item(),
                "kd": kd.item(),
                "ce": ce.item(),
                "alpha": a,
                "lr": lr,
            }
            if args.eval_store and (step % args.eval_every == 0 or step == args.steps):
                record |= evaluate(model, args.eval_store, args)
            if step % 20 == 0 or "eval_ce" in record:
                tps = (
                    (step - first_step)
                    * args.batch_size
                    * args.seq_len
                    / (time.perf_counter() - t0)
                )
                extra = (
                    (
                        f" | eval ce {record['eval_ce']:.3f} ppl {record['eval_ppl']:.1f} "
                        f"kl {record['eval_kl']:.3f}"
                    )
                    if "eval_ce" in record
                    else ""
                )
                print(
                    f"step {step:5d} loss {record['loss']:.3f} (kd {record['kd']:.3f}, "
                    f"ce {record['ce']:.3f}, alpha {a:.2f}) {tps:,.0f} tok/s{extra}",
                    file=sys.stderr,
                )
            log.write(json.dumps(record) + "\n")
            stop = step == args.stop_at
            if step % args.save_every == 0 or step == args.steps or stop:
                tmp = ckpt.with_suffix(".tmp")  # write-then-rename: a crash keeps the last one
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "loader": loader.state_dict(),
                        "step": step,
                        "epoch": epoch,
                        "args": vars(args),
                    },
                    tmp,
                )
                tmp.replace(ckpt)
            if step >= args.steps or stop:
                break
        else:
            epoch += 1
            continue
        break
    log.close()
    print(f"done: {step} steps; checkpoint {ckpt}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
