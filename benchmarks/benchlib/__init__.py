"""What the benchmark scripts share; no script imports another.

- ``report``: where results go, run metadata, Markdown/JSON tables, plots, the progress log.
- ``models``: the one GPT-2 builder (teachers, students, forward-pass references).
- ``corpus``: the standard library's source as text, its train/held-out split, the BPE.
- ``pretrain``: training and evaluating the benchmark teacher.
- ``teacher``: the cached benchmark teacher (settings, cache, save and reload check) and
  the tiny one of --quick runs.
- ``stores``: real teacher logits, rows tiled to any size, and the top-64 u8 store built
  from them (write, read and HTTP benchmarks).
- ``students``: the students of the trade-off and methods studies.

A script run as ``python benchmarks/X.py`` has benchmarks/ on ``sys.path``, so
``from benchlib.report import ...`` needs no path edits.
"""
