"""``medsam2 serve``: run the inference server on uvicorn.

    medsam2 serve --model NAME --token-file token.txt                 # 127.0.0.1:8765
    medsam2 serve --model NAME --token-file token.txt --host 0.0.0.0 \\
        --tls-cert server.crt --tls-key server.key                    # reachable from the network
    medsam2 serve --users-file users.json --add-user alice            # prints alice's new token once
    medsam2 serve --model NAME --users-file users.json                # one token per user

The command line (:mod:`medsam2.cli.serve`) adds ``add_serve_arguments`` to its ``serve`` parser and
runs ``run_server``. FastAPI and uvicorn are imported only when the server starts,
so the rest of the command line works without the ``server`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from medsam2.errors import DeviceUnavailableError, MedSAM2Error, ModelError
from medsam2.predictor import EngineVideoPredictor
from medsam2.server.settings import TOKEN_ENV, ServerConfigError, ServerSettings

MiB = 1 << 20
GiB = 1 << 30


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host", default=defaults.host, help="address to bind (default %(default)s: this machine only)"
    )
    net.add_argument("--port", type=int, default=defaults.port, help="TCP port (default %(default)s)")
    net.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the one API token clients must send (default: ${TOKEN_ENV}); this, the "
        "variable or --users-file is required",
    )
    net.add_argument(
        "--users-file",
        metavar="FILE",
        help="JSON file of users, each with a hashed token (instead of --token-file); see --add-user",
    )
    net.add_argument("--tls-cert", metavar="PEM", help="TLS certificate (serve https)")
    net.add_argument("--tls-key", metavar="PEM", help="TLS private key for --tls-cert")
    net.add_argument(
        "--insecure-no-tls",
        action="store_true",
        help="allow a non-loopback --host without TLS (tokens and images cross the network unencrypted)",
    )
    net.add_argument(
        "--access-log", metavar="FILE", help="also append the one-line-per-request access log to FILE"
    )
    users = parser.add_argument_group("users (with --users-file; the command adds the user and exits)")
    users.add_argument("--add-user", metavar="NAME", help="add a user and print their new token once")
    users.add_argument("--admin", action="store_true", help="the new user may list and end every session")
    users.add_argument(
        "--user-max-sessions", type=int, metavar="N", help="sessions the new user may have open at once"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="model to serve, by registry name; repeat for several (the first is the default); "
        "default: the registry's default model",
    )
    model.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="serve a local checkpoint (e.g. a fine-tuned model) under the name --model gives "
        "(default: the file's name)",
    )
    model.add_argument(
        "--config", metavar="YAML", help="model config for --checkpoint (packaged name or file)"
    )
    model.add_argument("--image-size", type=int, help="model input size for --checkpoint")
    model.add_argument("--device", default=defaults.device, help="auto, cuda, cuda:N, mps or cpu")
    model.add_argument(
        "--devices",
        metavar="LIST",
        help="several devices, e.g. cuda:0,cuda:1, or auto (every GPU): each new session goes to the one "
        "with the most free memory within its budget (--memory-budget-gb is then per device); "
        "replaces --device",
    )
    model.add_argument(
        "--no-preload", action="store_true", help="load models on first use instead of at start"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-upload-mb",
        type=float,
        default=defaults.max_upload_bytes / MiB,
        help="largest compressed volume upload (default %(default)g)",
    )
    limits.add_argument(
        "--max-voxels",
        type=int,
        default=defaults.max_voxels,
        help="largest volume in voxels (default %(default)d)",
    )
    limits.add_argument(
        "--max-sessions",
        type=int,
        default=defaults.max_sessions,
        help="sessions open at once (default %(default)d)",
    )
    limits.add_argument(
        "--idle-minutes",
        type=float,
        default=defaults.idle_seconds / 60,
        help="close a session after this long without requests (default %(default)g)",
    )
    limits.add_argument(
        "--memory-budget-gb",
        type=float,
        help="device memory shared by all sessions (volumes + feature caches); default: half of what is free",
    )
    limits.add_argument(
        "--cache-gb-per-session",
        type=float,
        help="cap on one session's slice-feature cache (default: all of its slices)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        users_file=args.users_file,
        tls_certfile=args.tls_cert,
        tls_keyfile=args.tls_key,
        insecure_no_tls=args.insecure_no_tls,
        access_log=args.access_log,
        models=tuple(args.models or ()),
        device=args.device,
        max_upload_bytes=int(args.max_upload_mb * MiB),
        max_voxels=args.max_voxels,
        max_sessions=args.max_sessions,
        idle_seconds=args.idle_minutes * 60,
        memory_budget_bytes=None if args.memory_budget_gb is None else int(args.memory_budget_gb * GiB),
        cache_bytes_per_session=None
        if args.cache_gb_per_session is None
        else int(args.cache_gb_per_session * GiB),
    )


def _registry() -> Any:
    try:
        return importlib.import_module("medsam2.models.registry")
    except ImportError as exc:
        raise ModelError(f"the model registry cannot be imported ({exc}); reinstall medsam2slicer") from None


def served_models(args: argparse.Namespace) -> tuple[str, ...]:
    """The names clients may ask for: --model names, the checkpoint's name, or the registry's default."""
    names = tuple(args.models or ())
    if getattr(args, "checkpoint", None):
        if len(names) > 1:
            raise ServerConfigError(
                "with --checkpoint the server serves that one model; give at most one --model"
            )
        return names or (Path(args.checkpoint).stem,)
    return names or (str(_registry().DEFAULT_MODEL),)


def registry_predictor_factory(
    device: torch.device,
    checkpoint: Optional[str] = None,
    checkpoint_name: Optional[str] = None,
    config: Optional[str] = None,
    image_size: Optional[int] = None,
) -> Callable[[str], EngineVideoPredictor]:
    """Models by name through the model registry; ``checkpoint_name`` is served from a local file."""

    def factory(name: str) -> EngineVideoPredictor:
        load = _registry().load_model
        if checkpoint is not None and name == checkpoint_name:
            predictor, _entry = load(None, checkpoint=checkpoint, config=config, image_size=image_size, device=device)
        else:
            predictor, _entry = load(name, device=device)
        return predictor

    return factory


def multi_device_options(
    args: argparse.Namespace, settings: ServerSettings
) -> tuple[dict[str, Any], list[torch.device]]:
    """SessionManager options for ``--devices`` (none without it) and the devices it names."""
    if not getattr(args, "devices", None):
        return {}, []
    from medsam2.server.placement import DevicePlacement, parse_devices

    devices = parse_devices(args.devices)

    def device_factory(name: str, on: torch.device) -> EngineVideoPredictor:
        return registry_predictor_factory(on, args.checkpoint, settings.models[0], args.config, args.image_size)(name)

    placement = DevicePlacement(devices, budget_per_device=settings.memory_budget_bytes)
    return {"placement": placement, "device_factory": device_factory}, devices


def run_server(args: argparse.Namespace) -> int:
    """Start serving; returns an exit code with a one-line message for bad settings (the command
    line's codes: 2 bad settings, 3 model unavailable, 4 device unavailable)."""
    if args.add_user is not None:
        return _add_user(args)
    if args.admin or args.user_max_sessions is not None:
        print("medsam2 serve: error: --admin and --user-max-sessions describe a user for --add-user", file=sys.stderr)
        return 2
    try:
        settings = dataclasses.replace(settings_from_args(args), models=served_models(args))
        settings.validate()
        users = settings.resolve_users()
        try:
            import uvicorn

            from medsam2.server.app import create_app
        except ImportError as exc:
            raise ServerConfigError(
                f"the server needs FastAPI and uvicorn ({exc.name or exc} is missing): "
                "pip install 'medsam2slicer[server]'"
            ) from None
        from medsam2.devices import resolve_device

        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if settings.access_log:
            _log_access_to(settings.access_log)
        device = resolve_device(settings.device if not getattr(args, "devices", None) else "cpu")
        factory = registry_predictor_factory(
            device, args.checkpoint, settings.models[0], args.config, args.image_size
        )
        options, devices = multi_device_options(args, settings)
        app = create_app(settings, factory, manager_options=options)
        if not args.no_preload:
            for name in settings.models:
                for slot, on in enumerate(devices or [device]):
                    print(f"loading model {name} on {on} ...", file=sys.stderr, flush=True)
                    app.state.manager.predictor(name, slot)
        if settings.users_file:
            print(f"{len(users.users)} user(s) from {settings.users_file}", file=sys.stderr)
        if not settings.loopback_only and not settings.tls:  # only with --insecure-no-tls (validate)
            print(
                f"warning: serving on {settings.host} without TLS: the token and the images cross the "
                "network unencrypted (--insecure-no-tls); pass --tls-cert and --tls-key",
                file=sys.stderr,
            )
    except MedSAM2Error as exc:
        print(f"medsam2 serve: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, ModelError) else 4 if isinstance(exc, DeviceUnavailableError) else 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        log_level=args.log_level,
        access_log=False,  # access_log.py logs each request without its query string
        timeout_graceful_shutdown=15,
    )
    return 0


def _add_user(args: argparse.Namespace) -> int:
    from medsam2.server.users import add_user

    if not args.users_file:
        print("medsam2 serve: error: --add-user needs --users-file FILE (created if missing)", file=sys.stderr)
        return 2
    try:
        token = add_user(
            args.users_file, args.add_user, admin=args.admin, max_sessions=args.user_max_sessions
        )
    except MedSAM2Error as exc:
        print(f"medsam2 serve: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"added user {args.add_user} to {args.users_file}; their token (shown only now, the file keeps its "
        "hash):",
        file=sys.stderr,
    )
    print(token)
    return 0


def _log_access_to(path: str) -> None:
    from medsam2.server.access_log import access_log

    try:
        handler = logging.FileHandler(Path(path).expanduser(), encoding="utf-8")
    except OSError as exc:
        raise ServerConfigError(f"cannot open access log {path}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
