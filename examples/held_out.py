"""Write the shipped teacher's held-out text as JSON lines ``{"text": ...}``: the standard-
library files listed in examples/teacher/held_out.txt, which the teacher never saw in training,
read from the running interpreter's stdlib.

    python examples/held_out.py --out sample.jsonl --max-docs 28

``--max-docs N`` takes the first N listed files; empty files are left out. On a Python other
than the one the teacher was trained on (examples/teacher/report.json), listed files that this
stdlib lacks are skipped with a word on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

LIST = Path(__file__).resolve().parent / "teacher" / "held_out.txt"


def listed_files(path: Path) -> list[str]:
    """The relative paths in a held-out list (``#`` lines are comments)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="JSON lines file to write")
    p.add_argument("--max-docs", type=int, default=None, help="only the first N listed files")
    p.add_argument("--list", type=Path, default=LIST, help="held-out list (default: %(default)s)")
    args = p.parse_args(argv)
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = listed_files(args.list)[: args.max_docs]
    missing = [rel for rel in chosen if not (root / rel).is_file()]
    if missing:
        print(f"{len(missing)} listed files are not in {root}: skipped", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with args.out.open("w", encoding="utf-8") as fh:
        for rel in chosen:
            if rel in missing:
                continue
            # Lenient decoding: the stdlib holds deliberately mis-encoded files (codec tests).
            text = (root / rel).read_bytes().decode("utf-8", errors="ignore")
            if text.strip():
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                written += 1
    print(f"wrote {written} held-out documents to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
