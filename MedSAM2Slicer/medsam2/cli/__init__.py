"""The ``medsam2`` command line: ``main`` dispatches to one module per command (see main.py)."""

from medsam2.cli.main import main

__all__ = ["main"]
