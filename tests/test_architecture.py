"""The architecture is checked, not hoped for: which part may import which (docs/ARCHITECTURE.md),
and that reading, inspecting and serving never pay for torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitstore

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "logitstore"

#: part → the parts of logitstore it may import (besides itself and ``errors``), and whether
#: it may import torch/transformers. ``train`` writes stores (co-distillation records its
#: teacher), so it may use ``write``; nothing below ``cli`` imports ``cli``.
ALLOWED: dict[str, tuple[set[str], bool]] = {
    "format": (set(), False),
    "read": ({"format"}, True),  # torch only in the Dataset's modules (TORCH_READ, below)
    "tools": ({"format", "read"}, False),
    "write": ({"format"}, True),
    "train": ({"format", "read", "write"}, True),
    "cli": ({"format", "read", "write", "train", "tools"}, True),
}
HEAVY = {"torch", "transformers", "tokenizers"}
#: the read side's torch modules: the Dataset, its blocks, its collate
TORCH_READ = {PACKAGE / "read" / f for f in ("dataset.py", "blocks.py", "collate.py")}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, whether at module level) for every import in ``path``."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    tree = ast.parse(path.read_text())
    # Module level means run on import: not in a function, nor under `if TYPE_CHECKING:`.
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # `from . import x`: x may be a module
                    found += [(f"{module}.{a.name}", id(node) in top_level) for a in node.names]
                    continue
            else:
                module = node.module or ""
            found.append((module, id(node) in top_level))
    return found


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_parts_below_it(part: str) -> None:
    allowed, heavy_ok = ALLOWED[part]
    problems = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for module, at_top in _imports(path):
            names = module.split(".")
            if names[0] == "logitstore" and len(names) > 1:
                target = names[1]
                if target not in allowed | {part, "errors", "__version__"}:
                    problems.append(f"{path.relative_to(ROOT)} imports {module}")
            # The CLI is the composition root: only `serve` and `view`, inside their handlers,
            # start the server package; nothing in the library imports it or the benchmarks.
            serving = path in (PACKAGE / "cli" / "serve.py", PACKAGE / "cli" / "view.py")
            lazy_serve = serving and not at_top
            if names[0] in ("logitstore_server", "server", "benchmarks") and not lazy_serve:
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
            if names[0] in HEAVY and at_top:
                torch_file = path in TORCH_READ
                if not heavy_ok or (part == "read" and not torch_file):
                    problems.append(f"{path.relative_to(ROOT)} imports {module} at module level")
    assert not problems, "\n".join(problems)


def test_the_benchmarks_are_imported_by_nothing_outside_them() -> None:
    outside = [ROOT / d for d in ("logitstore", "server", "tests", "examples")]
    for path in [p for d in outside for p in sorted(d.rglob("*.py"))]:
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("benchmarks", "benchlib"), (
                f"{path} imports {module}"
            )


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_names(path: Path) -> list[str]:
    """``from logitstore... import _x`` and ``logitstore.…._x`` module paths in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("logitstore"):
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            found += [f"{path.name}:{node.lineno} {node.module}" for p in parts if _private(p)]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("logitstore") and any(p[:1] == "_" for p in a.name.split(".")):
                    found.append(f"{path.name}:{node.lineno} {a.name}")
    return found


def test_the_server_and_benchmarks_use_no_private_name_of_the_library() -> None:
    # They may import logitstore's modules (e.g. logitstore.read.store.check_range), never
    # a name the library keeps to itself: those change without notice.
    paths = [*(ROOT / "server").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    problems = [f for path in sorted(paths) for f in _private_names(path)]
    assert not problems, "\n".join(problems)


def test_public_names_are_all_lazily_exported() -> None:
    exports = logitstore._EXPORTS  # type: ignore[attr-defined]
    # (the order of __all__ is ruff's RUF022: constants, classes, functions)
    assert set(logitstore.__all__) == {*exports, "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        logitstore.nope  # type: ignore[attr-defined]  # noqa: B018


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arch") / "s.zarr"
    with logitstore.StoreWriter(
        out,
        encoding=logitstore.Encoding("topk", "u8", k=4),
        vocab_size=50,
        input_ids=np.arange(64) % 50,
        offsets=np.array([0, 30, 64]),
    ) as writer:
        import torch

        logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
        writer.write(
            0, logitstore.encode_rows(logits, writer.metadata.encoding, 0, torch.arange(64))
        )
    return out


def test_import_and_help_do_not_import_torch() -> None:
    assert not {"torch", "transformers", "zarr"} & _modules_after("import logitstore")
    help_run = (
        "from logitstore.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "torch" not in _modules_after(help_run)


@pytest.mark.parametrize("command", ["info", "verify", "show", "export"])
def test_commands_that_only_read_do_not_import_torch(small_store: Path, command: str) -> None:
    extra = {"info": [], "verify": ["--no-progress"], "show": ["--position", "3"]}
    argv = [command, str(small_store), *extra.get(command, ["--jsonl", "--ids"])]
    code = (
        "import contextlib, io\nfrom logitstore.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv}) == 0"
    )
    assert "torch" not in _modules_after(code)


def test_reading_a_store_does_not_import_torch(small_store: Path) -> None:
    code = (
        f"import logitstore\ns = logitstore.open({str(small_store)!r})\n"
        "b = s.read(0, len(s))\nassert b.probs.shape == (64, 4)"
    )
    assert "torch" not in _modules_after(code)
