"""Co-distillation checkpoints: written whole (temp file, then rename) and refused whole
(every check before anything is loaded), so a resumed run continues bit for bit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import LogitStoreError

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    path: Path,
    count: int,
    steps: int,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    schedulers: Sequence[Any],
) -> None:
    state = {
        "format": "logitstore-codistill",
        "version": 1,
        "step": count,
        "steps": steps,
        "teacher": teacher.state_dict(),
        "student": student.state_dict(),
        "teacher_optimizer": teacher_optimizer.state_dict(),
        "student_optimizer": student_optimizer.state_dict(),
        "schedulers": [s.state_dict() for s in schedulers],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash leaves the previous checkpoint, never half of one


def load_checkpoint(
    path: Path,
    steps: int,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    schedulers: Sequence[Any],
) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise LogitStoreError(
            f"cannot read the co-distillation checkpoint {str(path)!r}: {e}; remove it to "
            "start again"
        ) from None
    keys = {
        "step", "steps", "teacher", "student", "teacher_optimizer", "student_optimizer",
        "schedulers", "rng", "cuda_rng",
    }  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != "logitstore-codistill":
        raise LogitStoreError(f"{str(path)!r} is not a co-distillation checkpoint")
    if not keys <= state.keys():
        raise LogitStoreError(
            f"{str(path)!r} lacks {sorted(keys - state.keys())}: it is damaged or was not "
            "written by logitstore; remove it to start again"
        )
    # Every refusal comes before anything is loaded: a refused checkpoint leaves the models,
    # optimizers and schedulers exactly as the caller passed them.
    if state["steps"] != steps:
        raise LogitStoreError(
            f"{str(path)!r} is from a run of {state['steps']} steps, not {steps}: schedules "
            "would not continue the same way. Use the original --steps or another checkpoint"
        )
    if len(state["schedulers"]) != len(schedulers):
        raise LogitStoreError(
            f"the checkpoint has {len(state['schedulers'])} LR scheduler(s), this run "
            f"{len(schedulers)}: pass the same schedulers as the run that wrote it"
        )
    if not isinstance(state["step"], int) or not 0 <= state["step"] <= steps:
        raise LogitStoreError(f"{str(path)!r} records step {state['step']!r} of {steps}")
    _check_module(path, "teacher", teacher, state["teacher"])
    _check_module(path, "student", student, state["student"])
    _check_optimizer(path, "teacher_optimizer", teacher_optimizer, state["teacher_optimizer"])
    _check_optimizer(path, "student_optimizer", student_optimizer, state["student_optimizer"])
    if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8:
        raise LogitStoreError(f"{str(path)!r} holds no valid random-number-generator state")
    teacher.load_state_dict(state["teacher"])
    student.load_state_dict(state["student"])
    teacher_optimizer.load_state_dict(state["teacher_optimizer"])
    student_optimizer.load_state_dict(state["student_optimizer"])
    for s, sd in zip(schedulers, state["schedulers"], strict=True):
        s.load_state_dict(sd)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def _check_module(path: Path, name: str, module: torch.nn.Module, saved: Any) -> None:
    """Refuse ``saved`` unless it has exactly ``module``'s parameter and buffer names, with
    the same shapes: what ``load_state_dict`` would otherwise find after loading others."""
    live = module.state_dict()
    if not isinstance(saved, dict):
        raise LogitStoreError(f"{str(path)!r}: the {name}'s weights are not a state dict")
    missing, extra = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or extra:
        raise LogitStoreError(
            f"{str(path)!r} holds another {name} model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}. Resume with the models of the run that wrote it"
        )
    for key, tensor in live.items():
        other = saved[key]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            found = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise LogitStoreError(
                f"{str(path)!r}: the {name}'s {key} is {found}, the model's "
                f"{tuple(tensor.shape)}. Resume with the models of the run that wrote it"
            )


def _check_optimizer(path: Path, name: str, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Refuse ``saved`` unless its parameter groups hold as many parameters as ``optimizer``'s."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise LogitStoreError(f"{str(path)!r}: the {name} state is not an optimizer's")
    want = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
    have = [len(g.get("params", ())) for g in groups]
    if want != have:
        raise LogitStoreError(
            f"{str(path)!r}: the {name} has parameter groups of {have} parameters, this "
            f"run's {want}. Resume with the optimizer settings of the run that wrote it"
        )
