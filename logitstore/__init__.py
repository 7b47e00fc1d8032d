"""logitstore: compressed storage of teacher distributions for LLM knowledge distillation.

Write a store once from a teacher, read it from any number of student runs::

    import logitstore
    store = logitstore.open("teacher.zarr")
    batch = store.read(0, 4096)   # input_ids (n,), ids, probs (n, k), residual, loss_mask (n,)

The package's parts are its folders (docs/ARCHITECTURE.md): ``format`` (metadata, column
schema, storage, decoding, wire framing: NumPy and Zarr only), ``read`` (the store interface,
local and remote stores, the torch Dataset), ``write`` (teachers, encoding, the writer,
capture, inputs, generation), ``train`` (losses, co-distillation), ``tools`` (info, verify,
export) and ``cli``. Every public name is re-exported here and imported on first use
(PEP 562), so ``import logitstore`` and a reader or server that never trains do not import
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name → the module that defines it (a module itself where the name is a module)
_EXPORTS: dict[str, str] = {
    "FORMAT_VERSION": "logitstore.format.metadata",
    "Batch": "logitstore.format.codec",
    "CodistillStep": "logitstore.train.codistillation",
    "CorruptStoreError": "logitstore.errors",
    "EncodedRows": "logitstore.write.encode",
    "Encoding": "logitstore.format.metadata",
    "FormatError": "logitstore.errors",
    "GenerationSettings": "logitstore.write.generate",
    "IncompleteStoreError": "logitstore.errors",
    "KDConfig": "logitstore.train.hf",
    "KDTrainer": "logitstore.train.hf",
    "InputError": "logitstore.errors",
    "Layout": "logitstore.format.metadata",
    "LogitDataset": "logitstore.read.dataset",
    "LogitStore": "logitstore.read.local",
    "LogitStoreError": "logitstore.errors",
    "PositionError": "logitstore.errors",
    "Prompt": "logitstore.write.generate",
    "Recording": "logitstore.train.codistillation",
    "RemoteStore": "logitstore.read.remote",
    "ResumeMismatchError": "logitstore.errors",
    "Sequences": "logitstore.write.inputs",
    "StoreBase": "logitstore.read.store",
    "StoreExistsError": "logitstore.errors",
    "StoreMetadata": "logitstore.format.metadata",
    "StorageError": "logitstore.errors",
    "StoreNotFoundError": "logitstore.errors",
    "StoreWriter": "logitstore.write.writer",
    "Teacher": "logitstore.write.teacher",
    "TeacherError": "logitstore.errors",
    "UnsupportedVersionError": "logitstore.errors",
    "VerifyReport": "logitstore.tools.verify",
    "capture": "logitstore.write.capture",
    "codistill": "logitstore.train.codistillation",
    "codistillation_step": "logitstore.train.codistillation",
    "collate": "logitstore.read.dataset",
    "collate_for_trainer": "logitstore.train.hf",
    "copy_store": "logitstore.tools.copy",
    "encode_rows": "logitstore.write.encode",
    "export_jsonl": "logitstore.tools.export",
    "fold_to_vocab": "logitstore.read.dataset",
    "generate": "logitstore.write.generate",
    "kd_trainer_class": "logitstore.train.hf",
    "load_teacher": "logitstore.write.teacher",
    "losses": "logitstore.train.losses",
    "open": "logitstore.read",
    "plan_batches": "logitstore.write.capture",
    "protocol": "logitstore.format.protocol",
    "read_documents": "logitstore.write.inputs",
    "read_prompts": "logitstore.write.generate",
    "record_teacher": "logitstore.train.codistillation",
    "sequence_records": "logitstore.tools.export",
    "sequences_from_token_ids": "logitstore.write.inputs",
    "store_info": "logitstore.tools.info",
    "tokenize": "logitstore.write.inputs",
    "verify": "logitstore.tools.verify",
    "window_batches": "logitstore.train.codistillation",
}
_MODULES = frozenset({"losses", "protocol"})

__all__ = [
    "FORMAT_VERSION",
    "Batch",
    "CodistillStep",
    "CorruptStoreError",
    "EncodedRows",
    "Encoding",
    "FormatError",
    "GenerationSettings",
    "IncompleteStoreError",
    "InputError",
    "KDConfig",
    "KDTrainer",
    "Layout",
    "LogitDataset",
    "LogitStore",
    "LogitStoreError",
    "PositionError",
    "Prompt",
    "Recording",
    "RemoteStore",
    "ResumeMismatchError",
    "Sequences",
    "StorageError",
    "StoreBase",
    "StoreExistsError",
    "StoreMetadata",
    "StoreNotFoundError",
    "StoreWriter",
    "Teacher",
    "TeacherError",
    "UnsupportedVersionError",
    "VerifyReport",
    "__version__",
    "capture",
    "codistill",
    "codistillation_step",
    "collate",
    "collate_for_trainer",
    "copy_store",
    "encode_rows",
    "export_jsonl",
    "fold_to_vocab",
    "generate",
    "kd_trainer_class",
    "load_teacher",
    "losses",
    "open",
    "plan_batches",
    "protocol",
    "read_documents",
    "read_prompts",
    "record_teacher",
    "sequence_records",
    "sequences_from_token_ids",
    "store_info",
    "tokenize",
    "verify",
    "window_batches",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'logitstore' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on use
    from .errors import (
        CorruptStoreError,
        FormatError,
        IncompleteStoreError,
        InputError,
        LogitStoreError,
        PositionError,
        ResumeMismatchError,
        StorageError,
        StoreExistsError,
        StoreNotFoundError,
        TeacherError,
        UnsupportedVersionError,
    )
    from .format import protocol
    from .format.codec import Batch
    from .format.metadata import FORMAT_VERSION, Encoding, Layout, StoreMetadata
    from .read import open
    from .read.dataset import LogitDataset, collate
    from .read.local import LogitStore
    from .read.remote import RemoteStore
    from .read.store import StoreBase
    from .tools.copy import copy_store
    from .tools.export import export_jsonl, sequence_records
    from .tools.info import store_info
    from .tools.verify import VerifyReport, verify
    from .train import losses
    from .train.codistillation import (
        CodistillStep,
        Recording,
        codistill,
        codistillation_step,
        record_teacher,
        window_batches,
    )
    from .train.hf import KDConfig, KDTrainer, collate_for_trainer, kd_trainer_class
    from .write.capture import capture
    from .write.encode import EncodedRows, encode_rows
    from .write.generate import GenerationSettings, Prompt, generate, read_prompts
    from .write.inputs import Sequences, read_documents, sequences_from_token_ids, tokenize
    from .write.teacher import Teacher, load_teacher
    from .write.writer import StoreWriter
