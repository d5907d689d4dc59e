"""``medsam2 serve``: the inference server for a shared GPU (see :mod:`medsam2.server.serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from medsam2.cli.common import Handler
from medsam2.server import serve


def register(subparsers: Any, common: argparse.ArgumentParser) -> Handler:
    parser = subparsers.add_parser(
        "serve",
        parents=[common],
        help="run the inference server (HTTP API with token authentication)",
        description=serve.__doc__.split("\n\n")[0] if serve.__doc__ else None,
    )
    serve.add_serve_arguments(parser)
    return serve.run_server
