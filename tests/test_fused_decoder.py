"""The compiled decoder (format/fused.py, numba) beside NumPy's: which one runs, the errors a
user sees choosing, numba's on-disk cache read back by a fresh process, and whole stores read
both ways. The bits against the spec for both decoders: tests/test_decode_fast.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import logitstore
import logitstore.format.codec as codec
from logitstore import Encoding
from logitstore.format import fused
from logitstore.format.fused import DECODER_ENV
from logitstore.format.metadata import StoreMetadata
from logitstore.format.schema import StoredRows
from tests.conftest import table_store
from tests.test_decode_fast import _metadata
from tests.test_decode_fast import _rows as _spec_rows

pytest.importorskip("numba", reason="the fast extra is not installed")

REPO = Path(__file__).resolve().parents[1]


def _rows(n: int, m: int, vocab: int, seed: int) -> tuple[StoreMetadata, StoredRows]:
    """Top-``m`` u8 rows over a vocabulary of ``vocab``, with test_decode_fast's edges
    (padding, id 0 first, an all-padding row, an all-zero row)."""
    md = _metadata(Encoding("topk", "u8", k=m), m, n, vocab)
    return md, _spec_rows(md, n, seed)


def _digest(batch: codec.Batch) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in batch)).hexdigest()


def _decode(md: StoreMetadata, rows: StoredRows, setting: str, id_dtype: type) -> codec.Batch:
    """``decode_rows`` with ``LOGITSTORE_DECODER=setting`` (also in the subprocesses below,
    which have no monkeypatch), the variable as it was after."""
    before = os.environ.get(DECODER_ENV)
    os.environ[DECODER_ENV] = setting
    try:
        return codec.decode_rows(md, rows, id_dtype)
    finally:
        if before is None:
            del os.environ[DECODER_ENV]
        else:
            os.environ[DECODER_ENV] = before


def test_the_default_decoder_is_numba_where_it_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DECODER_ENV, raising=False)
    assert fused.decoder() == "numba"
    monkeypatch.setenv(DECODER_ENV, "numpy")
    assert fused.decoder() == "numpy"


def test_a_bad_decoder_setting_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    md, rows = _rows(4, 8, 300, 0)
    monkeypatch.setenv(DECODER_ENV, "fast")
    with pytest.raises(logitstore.LogitStoreError, match="LOGITSTORE_DECODER is 'fast'; expected"):
        codec.decode_rows(md, rows)
    store = table_store(
        tmp_path / "s", Encoding("topk", "u8", k=4), [list(range(40))], 20, vocab=64
    )
    cli = subprocess.run(
        [sys.executable, "-m", "logitstore", "info", str(store)],
        capture_output=True,
        text=True,
        env={**os.environ, DECODER_ENV: "fast"},
    )
    assert cli.returncode == 2, cli.stderr
    assert "LOGITSTORE_DECODER is 'fast'" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.parametrize("setting", ["numba", "auto"])
def test_without_numba_auto_uses_numpy_and_numba_says_how_to_install(
    setting: str, tmp_path: Path
) -> None:
    """numba made unimportable in a fresh interpreter (``sys.modules['numba'] = None`` is how
    Python marks a module that must not import): ``auto`` reads with NumPy; ``numba`` is
    refused when the store is opened, before any read."""
    store = table_store(
        tmp_path / "s", Encoding("topk", "u8", k=4), [list(range(40))], 20, vocab=64
    )
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import logitstore\n"
        "from logitstore.format import fused\n"
        "try:\n"
        f"    s = logitstore.open({str(store)!r}); s.read(0, len(s))\n"
        "    print('decoder', fused.decoder())\n"
        "except logitstore.LogitStoreError as e:\n    print('error', e)\n"
    )
    env = {**os.environ, DECODER_ENV: setting}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    if setting == "auto":
        assert out.stdout.strip() == "decoder numpy"
    else:
        want = "error LOGITSTORE_DECODER=numba, but numba's decoder cannot be used (Module"
        assert out.stdout.startswith(want), out.stdout
        assert "pip install 'logitstore[fast]'" in out.stdout


def test_the_kernel_takes_only_the_arrays_it_was_written_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anything else is NumPy's to decode (``decode_topk`` answers None): the kernel reads
    without bounds checks and is compiled for native, C-ordered, writeable arrays."""
    monkeypatch.delenv(DECODER_ENV, raising=False)
    table = np.zeros(256, np.float32)

    def arrays(m: int, n: int = 5, **dtypes: Any) -> dict[str, np.ndarray]:
        d: dict[str, Any] = {"gaps": np.uint16, "values": np.uint8, "target": np.float32}
        d.update(dtypes)
        return {
            "gaps": np.zeros((n, m), d["gaps"]),
            "values": np.zeros((n, m), d["values"]),
            "target": np.ones(n, d["target"]),
            "table": table,
            "ids": np.zeros((n, m), d.get("ids", np.int64)),
            "probs": np.zeros((n, m), np.float32),
        }

    assert fused.decode_topk(**arrays(64)) == 0
    assert fused.decode_topk(**arrays(128, gaps=np.uint32, ids=np.int32)) == 0
    assert fused.decode_topk(**arrays(129)) is None  # wider than the written-out pairwise sum
    assert fused.decode_topk(**arrays(0)) is None
    assert fused.decode_topk(**arrays(64, values=np.uint16)) is None
    assert fused.decode_topk(**arrays(64, ids=np.float64)) is None
    assert fused.decode_topk(**arrays(64, gaps=">u2")) is None  # big-endian
    a = arrays(64)
    assert fused.decode_topk(**{**a, "gaps": a["gaps"][:1]}) is None  # shapes disagree
    assert fused.decode_topk(**{**a, "target": a["target"][:4]}) is None
    strided = {k: (v[:, ::2] if v.ndim == 2 else v) for k, v in a.items()}
    assert fused.decode_topk(**strided) is None
    a["probs"].flags.writeable = False
    assert fused.decode_topk(**a) is None
    monkeypatch.setenv(DECODER_ENV, "numpy")
    assert fused.decode_topk(**arrays(64)) is None


class _Counting:
    """The real kernel, counting its calls."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.kernel(*args)


def test_reads_of_a_store_decode_with_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LogitStore.read and a Dataset read in this process go through the kernel, and not
    under ``LOGITSTORE_DECODER=numpy``."""
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 400, 200).tolist() for _ in range(4)]
    store = table_store(tmp_path / "s", Encoding("topk", "u8", k=16), docs, 100, vocab=400)
    monkeypatch.delenv(DECODER_ENV, raising=False)
    assert fused.decoder() == "numba"
    spy = _Counting(fused._kernel)
    monkeypatch.setattr(fused, "_kernel", spy)
    s = logitstore.open(store)
    s.read(0, len(s))
    assert spy.calls > 0
    ds = logitstore.LogitDataset(store, 50, seed=0, block_positions=128)  # warms: one call
    before = spy.calls
    list(DataLoader(ds, batch_size=4, collate_fn=logitstore.collate))
    assert spy.calls > before
    monkeypatch.setenv(DECODER_ENV, "numpy")
    before = spy.calls
    s.read(0, len(s))
    assert spy.calls == before


# Python 3.12+ warns of any fork while threads run: this test forks one on purpose.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_while_the_kernel_loads_leaves_the_child_a_free_lock() -> None:
    """The loader's lock is held while numba imports (~0.4 s), often on LogitDataset's
    read-ahead thread; a DataLoader worker forked then must not inherit it held (its first
    decode would wait forever): a fork waits for the load to finish."""
    held, release = threading.Event(), threading.Event()

    def load() -> None:
        with fused._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=load)
    t.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    pid = os.fork()  # waits for the lock, which the thread gives back after 0.3 s
    if pid == 0:
        os._exit(0 if fused._lock.acquire(timeout=5) else 1)
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_first_call_with_new_types_holds_the_lock_a_fork_waits_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """numba compiles (or loads from its cache) on a call with argument types it has not
    seen, holding its own lock: that call is made under the loader's lock, so a DataLoader
    worker is not forked mid-compile; later calls with those types take no lock."""
    monkeypatch.delenv(DECODER_ENV, raising=False)
    assert fused.decoder() == "numba"
    real, held = fused._kernel, []

    def kernel(*args: Any) -> Any:
        held.append(fused._lock.locked())
        return real(*args)

    monkeypatch.setattr(fused, "_kernel", kernel)
    monkeypatch.setattr(fused, "_ready", set())
    md, rows = _rows(50, 16, 70_000, seed=2)  # uint32 gaps
    for id_dtype in (np.int32, np.int32, np.int64, np.int64, np.int32):
        codec.decode_rows(md, rows, id_dtype)
    assert held == [True, False, True, False, False]


def test_a_kernel_that_fails_at_run_time_gives_way_to_numpy_or_a_clear_error(
    tmp_path: Path,
) -> None:
    """numba's cache directory replaced by a file after the kernel was loaded, so its first
    compile cannot save: under ``auto`` a warning and NumPy's bits; under ``numba`` an
    error that says what to do."""
    code = (
        "import os, shutil, warnings, numpy as np\n"
        "from tests.test_fused_decoder import _rows, _digest, _decode\n"
        "from logitstore.format import fused\n"
        "import logitstore.format.codec as codec\n"
        "from logitstore.errors import LogitStoreError\n"
        "md, rows = _rows(300, 64, 5000, seed=3)\n"
        "want = _digest(_decode(md, rows, 'numpy', np.int64))\n"
        "assert fused.decoder() == 'numba'\n"
        "cache = os.environ['NUMBA_CACHE_DIR']\n"
        "shutil.rmtree(cache, ignore_errors=True); open(cache, 'w').close()\n"
        "try:\n"
        "    with warnings.catch_warnings(record=True) as w:\n"
        "        warnings.simplefilter('always')\n"
        "        got = _digest(codec.decode_rows(md, rows))\n"
        "    print('decoded', got == want, fused.decoder(), str(w[0].message))\n"
        "except LogitStoreError as e:\n"
        "    print('error', e)\n"
    )
    for setting in ("auto", "numba"):
        env = {
            **os.environ,
            DECODER_ENV: setting,
            "NUMBA_CACHE_DIR": str(tmp_path / setting / "cache"),
        }
        (tmp_path / setting).mkdir()
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert out.returncode == 0, out.stderr[-2000:]
        if setting == "auto":
            assert out.stdout.startswith("decoded True numpy numba's decoder failed"), out.stdout
            assert "decoding with NumPy from now on" in out.stdout
        else:
            assert out.stdout.startswith("error numba's decoder failed"), out.stdout
            assert "set LOGITSTORE_DECODER=numpy" in out.stdout


def test_wrapped_ids_are_refused_by_both_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """uint32 gaps summing past int32: NumPy's running sum in int32 wrapped to a small id
    and passed; both decoders now check the sum itself."""
    md, rows = _rows(3, 4, 128_256, seed=1)
    assert rows.gaps is not None
    rows.gaps[1] = [100_000, 4_294_967_000, 0, 0]
    for setting in ("numpy", "numba"):
        monkeypatch.setenv(DECODER_ENV, setting)
        for id_dtype in (np.int32, np.int64):
            with pytest.raises(logitstore.CorruptStoreError, match="reach 4295067000"):
                codec.decode_rows(md, rows, id_dtype)


def test_ids_past_int32_are_an_error_not_a_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vocabulary past 2³¹ (the format allows up to 2³²) read into int32 ids: a clear
    error from both decoders, not ids wrapped negative; int64 ids read it."""
    md, rows = _rows(3, 4, 3_000_000_000, seed=1)
    assert rows.gaps is not None
    rows.gaps[1] = [2_500_000_000, 1, 0, 0]
    for setting in ("numpy", "numba"):
        monkeypatch.setenv(DECODER_ENV, setting)
        with pytest.raises(logitstore.LogitStoreError, match="more than int32 holds"):
            codec.decode_rows(md, rows, np.int32)
        assert codec.decode_rows(md, rows, np.int64).ids[1, :2].tolist() == [
            2_500_000_000,
            2_500_000_001,
        ]


@pytest.mark.parametrize("vocab", [300, 70_000, 3_000_000])
@pytest.mark.parametrize("m", [1, 7, 8, 64, 100, 128])
def test_both_decoders_give_the_same_bits(vocab: int, m: int) -> None:
    """Gaps of uint16 and uint32 (vocabularies past 65,536), ids of int64 and int32."""
    md, rows = _rows(517, m, vocab, seed=m + vocab)
    for id_dtype in (np.int64, np.int32):
        a = _decode(md, rows, "numpy", id_dtype)
        b = _decode(md, rows, "numba", id_dtype)
        assert _digest(a) == _digest(b), (m, vocab, id_dtype)
        assert b.ids.dtype == id_dtype


def test_a_fresh_process_reads_numbas_cache_and_gets_the_same_bits(tmp_path: Path) -> None:
    """numba compiles the kernel once and keeps it on disk; a second process loads it from
    there (the path where numba's cache once crashed on recursive functions, numba#6061)."""
    md, rows = _rows(2000, 64, 5000, seed=9)
    want = _digest(_decode(md, rows, "numpy", np.int64))
    np.savez(tmp_path / "rows.npz", **{k: v for k, v in rows._asdict().items() if v is not None})
    code = (
        "import sys, hashlib, numpy as np\n"
        "from tests.test_fused_decoder import _rows, _digest\n"
        "import logitstore.format.codec as codec\n"
        "md, rows = _rows(2000, 64, 5000, seed=9)\n"
        "print(_digest(codec.decode_rows(md, rows)))\n"
    )
    env = {**os.environ, DECODER_ENV: "numba", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    for run in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert out.returncode == 0, (run, out.stderr[-2000:])
        assert out.stdout.strip() == want, run
        assert any((tmp_path / "cache").rglob("*.nbi")), "numba kept no cache"


def test_a_store_reads_the_same_with_either_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A captured store through LogitStore.read and through a DataLoader with two worker
    processes, once per decoder: the same batches."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 400, int(rng.integers(30, 300))).tolist() for _ in range(12)]
    store = table_store(tmp_path / "s", Encoding("topk", "u8", k=32), docs, 128, vocab=400)
    got = {}
    for setting in ("numpy", "numba"):
        monkeypatch.setenv(DECODER_ENV, setting)
        s = logitstore.open(store)
        whole = s.read(0, len(s))
        ds = logitstore.LogitDataset(store, 64, seed=1, block_positions=256)
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=logitstore.collate)
        got[setting] = (whole, list(loader))
    (w0, b0), (w1, b1) = got["numpy"], got["numba"]
    assert _digest(w0) == _digest(w1)
    assert len(b0) == len(b1) > 0
    for x, y in zip(b0, b1, strict=True):
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_opening_and_inspecting_a_store_do_not_import_numba(tmp_path: Path) -> None:
    """numba (~0.4 s to import) loads on the first decode, not for `open`, `len` or `info`."""
    store = table_store(
        tmp_path / "s", Encoding("topk", "u8", k=4), [list(range(40))], 20, vocab=64
    )
    code = (
        "import sys, logitstore\n"
        f"s = logitstore.open({str(store)!r}); len(s); s.metadata; s.read_stored(0, 5)\n"
        "before = 'numba' in sys.modules\n"
        "s.read(0, 5)\n"
        "print(before, 'numba' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != DECODER_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_without_a_writable_cache_the_kernel_compiles_in_each_process(tmp_path: Path) -> None:
    """No place for numba's cache (the package's __pycache__ is not a directory, nor can the
    user-wide one be made): the kernel is compiled uncached, still numba's, same bits."""
    shutil.copytree(
        REPO / "logitstore", tmp_path / "logitstore", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "logitstore" / "format" / "__pycache__").write_text("")
    (tmp_path / "nohome").write_text("")
    code = (
        "import numpy as np, logitstore\n"
        f"assert logitstore.__file__.startswith({str(tmp_path)!r})\n"
        "from logitstore.format import codec, fused\n"
        "from tests.test_fused_decoder import _rows, _digest, _decode\n"
        "md, rows = _rows(300, 64, 5000, seed=3)\n"
        "want = _digest(_decode(md, rows, 'numpy', np.int64))\n"
        "print(fused.decoder(), _digest(_decode(md, rows, 'numba', np.int64)) == want)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (DECODER_ENV, "NUMBA_CACHE_DIR")}
    nohome = str(tmp_path / "nohome")
    env |= {"HOME": nohome, "XDG_CACHE_HOME": nohome + "/x", "PYTHONPATH": f"{tmp_path}:{REPO}"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["numba", "True"]
