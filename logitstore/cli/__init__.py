"""The ``logitstore`` command line (``main`` owns the exit codes)."""

from .main import main

__all__ = ["main"]
