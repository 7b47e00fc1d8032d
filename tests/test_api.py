"""The public API is a decision: renaming or removing a name must change this test."""

import pickle

import logitstore
from logitstore import errors


def test_public_names() -> None:
    assert set(logitstore.__all__) == {
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
        "ResumeMismatchError",
        "Sequences",
        "StoreExistsError",
        "StoreMetadata",
        "StorageError",
        "StoreNotFoundError",
        "StoreBase",
        "StoreWriter",
        "RemoteStore",
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
    }
    for name in logitstore.__all__:
        assert hasattr(logitstore, name)


def test_errors_are_value_errors_and_pickle() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, ValueError)
        e = cls("what was expected, what was found, what to do")
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is cls and str(again) == str(e)
    assert issubclass(errors.StoreNotFoundError, FileNotFoundError)
    assert issubclass(errors.StoreExistsError, FileExistsError)
    assert issubclass(errors.PositionError, IndexError)
