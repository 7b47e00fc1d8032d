"""logitstore: compressed storage of teacher distributions for LLM knowledge distillation.

Write a store once from a teacher, read it from any number of student runs::

    import logitstore
    store = logitstore.open("teacher.zarr")
    batch = store.read(0, 4096)   # input_ids (n,), ids, probs (n, k), residual, loss_mask (n,)
"""

__version__ = "0.2.0"

from . import losses, protocol
from .capture import Teacher, capture, load_teacher
from .codistillation import (
    CodistillStep,
    Recording,
    codistill,
    codistillation_step,
    record_teacher,
    window_batches,
)
from .data import Sequences, read_documents, sequences_from_token_ids, tokenize
from .dataset import LogitDataset, collate
from .encode import EncodedRows, encode_rows
from .errors import (
    CorruptStoreError,
    FormatError,
    IncompleteStoreError,
    InputError,
    LogitStoreError,
    PositionError,
    ResumeMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    TeacherError,
    UnsupportedVersionError,
)
from .export import export_jsonl, sequence_records
from .generation import GenerationSettings, Prompt, generate, read_prompts
from .info import store_info
from .metadata import FORMAT_VERSION, Encoding, Layout, StoreMetadata
from .reader import Batch, LogitStore, StoreBase, open
from .remote import RemoteStore
from .verify import VerifyReport, verify
from .writer import StoreWriter

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
    "encode_rows",
    "export_jsonl",
    "generate",
    "load_teacher",
    "losses",
    "open",
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
