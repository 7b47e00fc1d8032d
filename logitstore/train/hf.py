"""Distilling from a store inside ``transformers.Trainer`` and TRL's ``SFTTrainer``.

Three pieces, used together (README "Use with transformers / TRL")::

    ds = LogitDataset("teacher.zarr", seq_len=512, seed=0)    # or an http(s):// URL
    trainer = KDTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                        kd=KDConfig(alpha=0.9, temperature=1.0))
    trainer.train()                       # and trainer.train(resume_from_checkpoint=True)

- :func:`collate_for_trainer` (the default ``data_collator``): a :func:`~logitstore.collate`
  batch under names the Trainer understands. ``labels`` are already shifted (``labels[t]`` is
  token ``t + 1``, the token the teacher's stored distribution at ``t`` predicts), so the batch
  also carries them as ``shift_labels``: the Trainer counts ``num_items_in_batch`` from that
  key without dropping a position per row, and no model ever shifts them again.
- :func:`kd_loss`: ``α·KD + (1 − α)·CE`` as a sum over the positions with a learned next token,
  divided by the Trainer's ``num_items_in_batch`` (all micro-batches of an optimizer step, all
  ranks), so gradient accumulation and data parallelism give the gradient of one large batch.
- :class:`KDTrainerMixin`, and :class:`KDTrainer` = the mixin over ``Trainer``
  (:func:`kd_trainer_class` puts it over any Trainer subclass, e.g. TRL's ``SFTTrainer``).

Why a subclass and not ``compute_loss_func``: the Trainer calls ``compute_loss_func(outputs,
labels, num_items_in_batch)``, and the teacher's ids, probabilities and residual never reach
it; the model must also not receive them as keyword arguments. The subclass takes them out of
the batch, runs the model on ``input_ids``/``attention_mask`` alone, and scores its logits.

Ranks and resume: a :class:`~logitstore.LogitDataset` splits windows across data-parallel
ranks itself, every rank the same number of samples. Accelerate would split an
``IterableDataset`` again (or read it all on rank 0 and broadcast it), so the trainer builds
each rank's loader without that second split, after checking (or setting) the dataset's rank
against the Trainer's. The order of a store's windows is a pure function of (seed, epoch, rank,
world size, workers), and the Trainer passes the epoch through ``set_epoch``; resuming from a
checkpoint skips the batches the checkpoint's step had consumed, so the resumed run sees the
same batches, in the same order, as a run that was never stopped. (The Trainer skips them by
reading them: a resume costs the decoding of the epoch so far, no model work.) An epoch is
``len(dataloader)`` batches; with several DataLoader workers each worker's last batch may be
partial, and batches past that count are not trained that epoch (at most ``workers ×
(batch_size − 1)`` windows, the same on every rank).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from ..errors import LogitStoreError
from ..read.dataset import LogitDataset, collate
from . import losses
from .fused import distillation_loss

__all__ = [
    "TEACHER_KEYS",
    "KDConfig",
    "KDTrainer",
    "KDTrainerMixin",
    "collate_for_trainer",
    "kd_loss",
    "kd_trainer_class",
]

#: batch keys that hold the teacher's targets (never passed to the model)
TEACHER_KEYS = ("ids", "probs", "residual", "loss_mask")
#: every key of a collate_for_trainer batch (what a Trainer's column filter must keep)
_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "shift_labels", *TEACHER_KEYS)


@dataclass(frozen=True)
class KDConfig:
    """How the student learns from the store.

    Args:
        alpha: weight of the distillation term; ``1 − alpha`` weighs cross-entropy on the
            data's next tokens (``alpha = 1``: pure distillation).
        temperature: divides the student's logits in the KD term, which is then multiplied by
            T² (the teacher's temperature was fixed when the store was written).
        kd: ``forward_kl`` (teacher ‖ student, with the residual as one extra bucket: the
            default) or ``reverse_kl``.
        chunk_size: positions scored at once (bounds the float32 ``(chunk, V)`` memory).
    """

    alpha: float = 1.0
    temperature: float = 1.0
    kd: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    chunk_size: int | None = 4096

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LogitStoreError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise LogitStoreError(f"temperature must be positive, got {self.temperature}")
        if self.kd not in ("forward_kl", "reverse_kl"):
            raise LogitStoreError(f"kd must be 'forward_kl' or 'reverse_kl', got {self.kd!r}")


def collate_for_trainer(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A :class:`~logitstore.LogitDataset` batch for a Hugging Face Trainer.

    Keys: ``input_ids``, ``attention_mask`` (the model's inputs); ``labels`` and the same
    tensor as ``shift_labels`` ``(B, T)``, -100 where no next token is learned; the teacher's
    ``ids``, ``probs`` ``(B, T, m)``, ``residual`` and ``loss_mask`` ``(B, T)``.
    """
    batch = collate(samples)
    batch["shift_labels"] = batch["labels"]
    return batch


def kd_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    config: KDConfig,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``alpha · KD + (1 − alpha) · CE`` over the positions whose next token is learned.

    Both terms count the same positions (``labels >= 0``: inside the store's loss mask, with
    a next token in the sequence). With ``num_items_in_batch`` (the Trainer's count of them
    over a whole optimizer step) the sum is divided by it; without, by this batch's count.

    Args:
        logits: the student's ``(B, T, V)``.
        batch: a :func:`collate_for_trainer` batch (``labels``, ``ids``, ``probs``, ``residual``).
    """
    labels = batch["labels"]
    mask = labels >= 0  # (B, T)
    total = logits.new_zeros((), dtype=torch.float32)
    if config.kd == "forward_kl" and config.alpha > 0:
        # Fused: CE and forward KL from one log-softmax per chunk, the gradient written in
        # the forward pass (train/fused.py) — same value, a fraction of the separate losses'
        # time and memory. Both terms over ``mask``, as below.
        total = distillation_loss(
            logits,
            labels,
            batch["ids"],
            batch["probs"],
            batch["residual"],
            mask,
            alpha=config.alpha,
            temperature=config.temperature,
            reduction="sum",
            chunk_size=config.chunk_size,
        )
    elif config.alpha > 0:
        fn = losses.forward_kl if config.kd == "forward_kl" else losses.reverse_kl
        kd = fn(
            logits,
            batch["ids"],
            batch["probs"],
            batch["residual"],
            mask,
            temperature=config.temperature,
            reduction="sum",
            chunk_size=config.chunk_size,
        )
        total = total + config.alpha * kd
    if config.alpha < 1 and not (config.kd == "forward_kl" and config.alpha > 0):
        ce = losses.cross_entropy(logits, labels, reduction="sum")
        total = total + (1 - config.alpha) * ce
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    if isinstance(count, torch.Tensor):
        # A batch (or a whole step) with no learned position, e.g. windows inside a generated
        # store's prompt: its sum is 0, and so is its loss (0 / 0 would be NaN).
        return total / count.to(total.device).clamp_min(1)
    return total / max(count, 1)


class KDTrainerMixin:
    """Put before a ``transformers.Trainer`` class: it trains on a store's targets.

    Adds the keyword ``kd`` (a :class:`KDConfig`; default: pure forward KL at T = 1) and
    defaults ``data_collator`` to :func:`collate_for_trainer`. ``train_dataset`` is a
    :class:`~logitstore.LogitDataset` (its rank and world size are checked against the
    Trainer's, or set from them when it was made before ``torch.distributed`` started).

    Raises:
        LogitStoreError: a dataset made for another rank or world size; persistent
            DataLoader workers (they would keep the first epoch's order).
    """

    kd: KDConfig
    _eval_rows: int | None = None  # windows in the batch being evaluated
    loss_is_scaled_for_ga = True  # kd_loss divides by the whole step's count (or by GA steps)

    def __init__(self, *args: Any, kd: KDConfig | None = None, **kwargs: Any) -> None:
        self.kd = kd if kd is not None else KDConfig()
        kwargs.setdefault("data_collator", collate_for_trainer)
        dataset = kwargs.get("train_dataset")
        if isinstance(dataset, LogitDataset) and _needs_placeholder(type(self)):
            # TRL's SFTTrainer accepts only `datasets` datasets (and would tokenise them); it
            # gets a one-row stand-in, and the store's dataset is put in its place after.
            kwargs["train_dataset"] = _placeholder()
            args_obj = (
                kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
            )
            if args_obj is not None and getattr(args_obj, "dataset_kwargs", None) is None:
                args_obj.dataset_kwargs = {"skip_prepare_dataset": True}
        super().__init__(*args, **kwargs)
        if isinstance(dataset, LogitDataset):
            self.train_dataset = dataset
        if self.args.dataloader_persistent_workers:  # type: ignore[attr-defined]
            raise LogitStoreError(
                "dataloader_persistent_workers=True keeps the first epoch's worker copies of the "
                "dataset, so later epochs would repeat its order: leave it False"
            )

    # -- data -------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        cols = self._signature_columns  # type: ignore[has-type]
        self._signature_columns = [*cols, *(k for k in _BATCH_KEYS if k not in cols)]

    def _dataset_for_rank(self, dataset: LogitDataset) -> LogitDataset:
        rank, world = self.args.process_index, self.args.world_size  # type: ignore[attr-defined]
        if (dataset.rank, dataset.world_size) == (rank, world):
            return dataset
        if dataset.world_size == 1 and dataset.rank == 0:
            # Made before the process group started (the usual order in a script): this rank's
            # share, on a copy (the order is a pure function of these fields).
            dataset = copy.copy(dataset)
            dataset.rank, dataset.world_size = rank, world
            return dataset
        raise LogitStoreError(
            f"the LogitDataset was made for rank {dataset.rank} of {dataset.world_size}, but "
            f"this Trainer process is rank {rank} of {world}: make it with rank=None and "
            "world_size=None (the defaults) and let the trainer set them"
        )

    def get_train_dataloader(self) -> DataLoader[Any]:
        dataset = self.train_dataset
        if not isinstance(dataset, LogitDataset):
            return super().get_train_dataloader()
        return self._store_loader(
            dataset,
            self._train_batch_size,  # type: ignore[attr-defined]
            "training",
        )

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader[Any]:
        if isinstance(eval_dataset, str):  # a name among eval_dataset={...}
            eval_dataset = self.eval_dataset[eval_dataset]  # type: ignore[attr-defined]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset  # type: ignore[attr-defined]
        if not isinstance(dataset, LogitDataset):
            return super().get_eval_dataloader(eval_dataset)  # type: ignore[misc, no-any-return]
        return self._store_loader(
            dataset,
            self.args.eval_batch_size,  # type: ignore[attr-defined]
            "evaluation",
        )

    def evaluation_loop(self, dataloader: DataLoader[Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataloader.dataset, LogitDataset):
            # The Trainer repeats each batch's mean loss `eval_batch_size` times and relies on
            # accelerate's gather_for_metrics to cut the gathered last batch down to the
            # dataset's remainder, a cut that assumes accelerate split the batches across
            # ranks. Here every rank reads its own equal share (the same batch sizes on every
            # rank), so: keep this batch's rows of each rank, and gather them all. (The
            # Trainer sets gather_for_metrics back after the loop.)
            gather = self.accelerator.gather  # type: ignore[attr-defined]

            def gather_rows(t: Any) -> Any:
                rows = self._eval_rows
                if isinstance(t, torch.Tensor) and t.dim() and rows and t.shape[0] > rows:
                    t = t[:rows]
                return gather(t)

            self.gather_function = gather_rows
        return super().evaluation_loop(dataloader, *args, **kwargs)  # type: ignore[misc]

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        ids = inputs.get("input_ids")
        self._eval_rows = len(ids) if isinstance(ids, torch.Tensor) else None
        return super().prediction_step(model, inputs, *args, **kwargs)  # type: ignore[misc]

    def _store_loader(self, dataset: LogitDataset, batch_size: int, what: str) -> DataLoader[Any]:
        from accelerate.data_loader import prepare_data_loader

        dataset = self._dataset_for_rank(dataset)
        args = self.args  # type: ignore[attr-defined]
        collator = self._get_collator_with_removed_columns(  # type: ignore[attr-defined]
            self.data_collator,  # type: ignore[attr-defined]
            description=what,
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
        )
        # Device placement and set_epoch/skip support from accelerate, without its split
        # across processes: the dataset already holds only this rank's share.
        return prepare_data_loader(  # type: ignore[no-any-return]
            loader,
            device=args.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
        )

    # -- loss -------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        missing = [k for k in ("input_ids", "labels", *TEACHER_KEYS) if k not in inputs]
        if missing:
            raise LogitStoreError(
                f"the batch lacks {', '.join(missing)}: a KD trainer needs batches of a "
                "LogitDataset collated by collate_for_trainer (keys: input_ids, attention_mask, "
                f"labels, {', '.join(TEACHER_KEYS)}); found {', '.join(sorted(inputs))}"
            )
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if num_items_in_batch is None:
            # No count of the whole step: a mean over this micro-batch, scaled for accumulation.
            steps = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
            loss = kd_loss(logits, inputs, self.kd) / steps
        else:
            loss = kd_loss(logits, inputs, self.kd, num_items_in_batch)
            args = self.args  # type: ignore[attr-defined]
            if args.average_tokens_across_devices and args.world_size > 1:
                # The count is over all ranks and DDP averages gradients: undo the average.
                loss = loss * self.accelerator.num_processes  # type: ignore[attr-defined]
        return (loss, outputs) if return_outputs else loss


def kd_trainer_class(base: type) -> type:
    """``base`` (a ``transformers.Trainer`` subclass, e.g. TRL's ``SFTTrainer``) with
    :class:`KDTrainerMixin` in front.

    Example:
        >>> from trl import SFTTrainer
        >>> KDSFTTrainer = kd_trainer_class(SFTTrainer)
    """
    return type(f"KD{base.__name__}", (KDTrainerMixin, base), {"__module__": __name__})


def _needs_placeholder(cls: type) -> bool:
    """Whether a Trainer class refuses torch datasets (TRL's trainers take `datasets` ones)."""
    return any(c.__module__.startswith("trl.") for c in cls.__mro__)


def _placeholder() -> Any:
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [[0, 0]], "labels": [[-100, -100]]})


def _trainer() -> type:
    from transformers import Trainer

    return kd_trainer_class(Trainer)


#: ``transformers.Trainer`` with :class:`KDTrainerMixin`: train a student on a store.
KDTrainer: type = _trainer()
