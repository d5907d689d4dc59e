"""Checkpoint files as each publisher writes them, a real Hugging Face cache, and a local fake hub.

Weights are random (seeded) weights of the real sam2 configs: the same keys, shapes and dtypes the
published files have, so the loader is tested on the real structure without any download.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

TINY_20 = "configs/sam2/sam2_hiera_t.yaml"
TINY_21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
TEST_IMAGE_SIZE = 128
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_model(config: str, seed: int) -> torch.nn.Module:
    from medsam2.models.build import build_predictor

    return build_predictor(config, image_size=TEST_IMAGE_SIZE, seed=seed)


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- publisher layouts ------------------------------------------------------------------------------


def save_meta_layout(path: Path, state: dict[str, torch.Tensor], **extra: object) -> Path:
    """Meta SAM 2/2.1 and bowang-lab MedSAM2: ``{"model": state_dict}``."""
    torch.save({"model": state, **extra}, path)
    return path


def save_bare(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def save_medical_sam2_3d(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """Medical-SAM2's train_3d.py: ``net.to(dtype=torch.bfloat16)`` then ``{"model": net.state_dict()}``."""
    torch.save({"model": {k: v.to(torch.bfloat16) for k, v in state.items()}}, path)
    return path


def save_medical_sam2_2d(path: Path, model: torch.nn.Module) -> Path:
    """Medical-SAM2's train_2d.py on one GPU: ``{"model": net.state_dict(), "parameter": net._parameters}``
    (the top-level parameters, as nn.Parameter objects)."""
    parameters = OrderedDict((name, p) for name, p in model.named_parameters(recurse=False))
    torch.save({"model": model.state_dict(), "parameter": parameters}, path)
    return path


def save_medical_sam2_2d_data_parallel(path: Path, model: torch.nn.Module) -> Path:
    """train_2d.py with ``-distributed 0,1``: the net is a DataParallel, so every key starts with
    ``module.`` and ``net._parameters`` (the wrapper's own) is empty."""
    wrapped = torch.nn.DataParallel(model)
    torch.save({"model": wrapped.state_dict(), "parameter": wrapped._parameters}, path)
    return path


# --- bad files ------------------------------------------------------------------------------------------


def truncated_copy(source: Path, target: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


class MkdirPayload:
    """Pickles as a call to ``os.mkdir(sentinel)``: unpickling it with code execution allowed creates
    the folder, which is how a test proves the payload is live and that the loader did not run it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):  # noqa: D105
        return (os.mkdir, (self.sentinel,))


def save_with_payload(path: Path, sentinel: Path) -> Path:
    # the payload comes first in the pickle, so a plain unpickler reaches it before any tensor
    torch.save({"note": MkdirPayload(sentinel), "model": {"no_mem_embed": torch.zeros(1, 1, 256)}}, path)
    return path


# --- a real Hugging Face cache --------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def place_in_hub_cache(
    cache_dir: Path, repo_id: str, filename: str, source: Path, commit: str = COMMIT
) -> Path:
    """Lay a file out exactly as ``hf_hub_download`` does: ``models--org--name/blobs/<sha256>`` holds
    the bytes, ``snapshots/<commit>/<filename>`` links to it, ``refs/main`` names the commit. The folder
    name comes from huggingface_hub itself."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = repo / "blobs" / sha256_of(source)
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, blob)
    pointer = repo / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return pointer


# --- a fake hub on the loopback interface -----------------------------------------------------------------


class FakeHub:
    """Serves ``/<repo>/resolve/main/<file>`` with the headers hf_hub_download reads (X-Repo-Commit,
    X-Linked-Etag = SHA-256, X-Linked-Size) and honours HTTP Range requests.

    ``drop_first_get_after``: the first GET of each file sends that many bytes and closes the
    connection (a dropped download). ``announce_sha``: the SHA-256 announced instead of the real one
    (a server or a cache that lies)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.announce: dict[str, str] = {}
        self.drop_first_get_after: Optional[int] = None
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self._dropped: set[str] = set()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _lookup(self) -> Optional[bytes]:
                return hub.files.get(self.path.split("?")[0])

            def _send_headers(self, payload: bytes, status: int, length: int, start: int = 0) -> None:
                key = self.path.split("?")[0]
                sha = hub.announce.get(key) or hashlib.sha256(payload).hexdigest()
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(payload)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802
                hub.requests.append(("HEAD", self.path, None))
                payload = self._lookup()
                if payload is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send_headers(payload, 200, len(payload))

            def do_GET(self) -> None:  # noqa: N802
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                payload = self._lookup()
                if payload is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                status = 206 if rng else 200
                self._send_headers(payload, status, len(payload) - start, start)
                key = self.path.split("?")[0]
                if hub.drop_first_get_after is not None and key not in hub._dropped:
                    hub._dropped.add(key)
                    self.wfile.write(payload[start : start + hub.drop_first_get_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def add(self, repo_id: str, filename: str, payload: bytes, announce_sha: Optional[str] = None) -> None:
        key = f"/{repo_id}/resolve/main/{filename}"
        self.files[key] = payload
        if announce_sha:
            self.announce[key] = announce_sha

    def gets(self) -> list[tuple[str, str, Optional[str]]]:
        """GET requests for files (huggingface_hub also queries /api/ endpoints of its own)."""
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1]]

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
