"""Load figure for the inference server: N concurrent clients, the small test model, this machine.

The real server (``create_app`` on uvicorn, 127.0.0.1, a free port, a random token) runs in a child
process; N client threads each run complete sessions through RemoteSession, the way the Slicer
module's remote mode does: upload the volume, a click (preview back), propagate both ways, a
correction click, propagate again (cached features: nothing re-encoded), close. It prints sessions
per minute and latency percentiles per step as a table.

    python benchmarks/bench_server.py                          # 1, 2 and 4 clients, 2 sessions each
    python benchmarks/bench_server.py --clients 1 8 --sessions 3 --slices 40

The model is the packaged SAM 2.1 tiny config with seeded random weights at --image-size (128 by
default, as in the tests): no checkpoint is downloaded, and weights do not change the cost. All
traffic stays on loopback and every loop is bounded. The figures hold for the machine that printed
them only; the server takes forward passes in turn (server/locking.py), so on a CPU more clients
share the same throughput and latency grows with them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message=".*cannot import name '_C' from 'sam2'.*")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSAM2Slicer"))

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
STEPS = ("upload", "click", "propagate", "correction", "re-propagate", "session")


def serve(port: int, token: str, image_size: int, max_sessions: int) -> None:
    """The child process: the server with the small model."""
    import uvicorn

    from medsam2.models.build import build_predictor
    from medsam2.server.app import create_app
    from medsam2.server.settings import ServerSettings

    predictor = build_predictor(CONFIG, image_size=image_size, seed=0)
    settings = ServerSettings(token=token, models=("bench",), max_sessions=max_sessions, port=port)
    uvicorn.run(
        create_app(settings, lambda name: predictor), host="127.0.0.1", port=port, log_level="warning"
    )


def phantom(slices: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = np.indices((slices, size, size), dtype=float)
    inside = (
        ((k - slices / 2) / (slices / 3)) ** 2
        + ((j - size / 2) / (size / 4)) ** 2
        + ((i - size / 2) / (size / 5)) ** 2
    )
    return (np.where(inside <= 1, 120, -40) + rng.normal(0, 20, inside.shape)).astype(np.int16)


def one_session(url: str, token: str, volume: np.ndarray, timings: dict[str, list[float]]) -> None:
    from medsam2.remote import RemoteSession

    slices, rows, cols = volume.shape
    mid = slices // 2
    t0 = time.perf_counter()
    session = RemoteSession(url, token, volume, intensity="400,40", poll_interval=0.05)
    t1 = time.perf_counter()
    session.add_points(1, [[cols / 2, rows / 2, mid]], [1])
    t2 = time.perf_counter()
    session.propagate()
    t3 = time.perf_counter()
    session.add_points(1, [[cols / 2 + cols / 6, rows / 2, min(mid + 2, slices - 1)]], [0])
    t4 = time.perf_counter()
    session.propagate()
    t5 = time.perf_counter()
    session.close()
    t6 = time.perf_counter()
    for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t0), strict=True):
        timings[step].append(seconds)


def run_level(url: str, token: str, clients: int, sessions: int, volume: np.ndarray) -> tuple[float, dict]:
    timings: dict[str, list[float]] = {s: [] for s in STEPS}
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(sessions):
                one_session(url, token, volume, timings)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"client failed: {errors[0]}")
    return wall, timings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit("the server process exited during start-up")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sessions", type=int, default=2, help="sessions per client")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=128, help="in-plane size of the volume")
    parser.add_argument("--image-size", type=int, default=128, help="model input size")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    token = os.environ.get("MEDSAM2_BENCH_TOKEN") or secrets.token_urlsafe(32)
    if args.serve:
        serve(args.serve, token, args.image_size, max(args.clients))
        return

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--image-size",
            str(args.image_size),
            "--clients",
            *map(str, args.clients),
        ],
        env={**os.environ, "MEDSAM2_BENCH_TOKEN": token},
    )
    try:
        wait_healthy(url, child)
        volume = phantom(args.slices, args.size, seed=0)
        one_session(url, token, volume, {s: [] for s in STEPS})  # warm-up: first forward passes
        print(
            f"server load: SAM 2.1 tiny (random weights) at {args.image_size} px, volume {volume.shape} "
            f"int16, {args.sessions} sessions per client, {os.cpu_count()} CPU(s)\n"
        )
        header = f"{'clients':>7} {'sessions/min':>12}" + "".join(
            f" {s + ' p50/p90/p99 s':>26}" for s in STEPS
        )
        print(header)
        print("-" * len(header))
        for clients in args.clients:
            wall, timings = run_level(url, token, clients, args.sessions, volume)
            cells = []
            for step in STEPS:
                p50, p90, p99 = np.percentile(timings[step], [50, 90, 99])
                cells.append(f" {f'{p50:.2f}/{p90:.2f}/{p99:.2f}':>26}")
            print(f"{clients:>7} {clients * args.sessions / wall * 60:>12.1f}" + "".join(cells))
    finally:
        child.terminate()
        child.wait(30)


if __name__ == "__main__":
    main()
