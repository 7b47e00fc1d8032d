"""The CUDA paths: capture with the teacher and the encoder on a GPU must write the store a
CPU capture writes (the same candidates; values within the teacher's float rounding).
Skipped where there is no CUDA device (conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import Encoding

from .conftest import CORPUS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "encoding",
    [Encoding("topk", "fp32", k=16), Encoding("sampled", "count", samples=32)],
    ids=["topk", "sampled"],
)
def test_capture_on_cuda_writes_what_cpu_capture_writes(
    teacher_dir: Path, tmp_path: Path, encoding: Encoding
) -> None:
    stores = {}
    for device in ("cpu", "cuda"):
        teacher = logitstore.load_teacher(str(teacher_dir), device, "float32")
        seqs = logitstore.sequences_from_token_ids(
            [np.asarray(teacher.tokenizer(c * 2)["input_ids"]) for c in CORPUS], 48
        )
        stores[device] = logitstore.capture(
            teacher, seqs, tmp_path / device, encoding, batch_size=4, progress=False
        )
    cpu, gpu = (logitstore.open(stores[d]) for d in ("cpu", "cuda"))
    a, b = cpu.read(0, len(cpu)), gpu.read(0, len(gpu))
    assert np.array_equal(a.input_ids, b.input_ids)
    if encoding.kind == "topk":
        # Near-ties may swap the last candidate between devices; the mass must agree.
        same = (a.ids == b.ids).all(axis=1)
        assert same.mean() > 0.95
        np.testing.assert_allclose(a.probs[same], b.probs[same], atol=1e-5)
        np.testing.assert_allclose(a.residual, b.residual, atol=1e-4)
    else:  # sampling draws from the same seeded uniforms over nearly equal CDFs
        assert (a.ids == b.ids).all(axis=1).mean() > 0.9
    assert logitstore.verify(stores["cuda"]).ok
