"""Hugging Face Hub downloads: into the hub's standard cache (or a folder in the same layout), once.

* A file already in the cache is returned without any network call, so every use after the first
  works offline and on air-gapped machines (``HF_HUB_OFFLINE=1`` or not).
* Environment variables are read at call time, not at import time as huggingface_hub does, so that
  ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_ENDPOINT`` set by the Slicer module or a
  test after import still apply.
* Downloads go through ``hf_hub_download`` unchanged, which writes to a temporary file, resumes with
  HTTP range requests after a dropped connection, and only then moves the file into place: a failed
  download never leaves a partial checkpoint where a loader would find it.
* After a download the file is hashed. The hub names each large-file blob in its cache by the SHA-256
  of its content (the LFS object id), so that name is the reference even where the catalogue knows no
  hash; a catalogue hash marked certain is checked too.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from medsam2.errors import ModelError

ProgressCallback = Callable[[int, Optional[int]], None]
Progress = Union[bool, ProgressCallback]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = {"1", "true", "yes", "on"}
# Head room kept free beyond the file itself (the hub's lock files, the OS, the user's own work).
_DISK_MARGIN_BYTES = 64 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) set to a true value."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def default_cache_dir() -> Path:
    """The hub cache folder, resolved from the environment now: HF_HUB_CACHE, then HF_HOME/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(os.path.expandvars(os.path.expanduser(value)))
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _cache(cache_dir: Union[str, os.PathLike, None]) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()


def cached_file(
    repo_id: str, filename: str, cache_dir: Union[str, os.PathLike, None] = None
) -> Optional[Path]:
    """The cached copy of ``repo_id/filename`` at the cache's ``main`` ref, or None. No network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(_cache(cache_dir)))
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def hub_recorded_sha256(path: Union[str, os.PathLike]) -> Optional[str]:
    """The SHA-256 the hub cache recorded for a snapshot file: the name of the blob it links to.
    None for files outside a hub cache and for small non-LFS files (named by a git SHA-1)."""
    file = Path(path)
    if not file.is_symlink():
        return None
    target = Path(os.path.realpath(file))
    if target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    return None


def sha256_file(path: Union[str, os.PathLike], progress: Optional[ProgressCallback] = None) -> str:
    file = Path(path)
    total = file.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with open(file, "rb") as handle:
        while True:
            chunk = handle.read(_HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


@dataclass(frozen=True)
class HashCheck:
    """The result of re-hashing one file against the references that exist for it."""

    path: Path
    actual: str
    hub_sha256: Optional[str]
    catalogue_sha256: Optional[str]
    catalogue_certain: bool

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def problem(self) -> Optional[str]:
        if self.hub_sha256 and self.actual != self.hub_sha256:
            return f"SHA-256 {self.actual[:16]}... does not match the hub's {self.hub_sha256[:16]}..."
        if self.catalogue_sha256 and self.catalogue_certain and self.actual != self.catalogue_sha256:
            return (
                f"SHA-256 {self.actual[:16]}... does not match the publisher's "
                f"{self.catalogue_sha256[:16]}... recorded in the model catalogue"
            )
        return None

    @property
    def note(self) -> str:
        """What the check rested on, for ``medsam2 models verify``."""
        if self.problem:
            return self.problem
        refs = []
        if self.hub_sha256:
            refs.append("hub SHA-256")
        if self.catalogue_sha256 and self.catalogue_certain:
            refs.append("catalogue SHA-256")
        text = "matches " + " and ".join(refs) if refs else "no reference SHA-256 to compare with"
        if self.catalogue_sha256 and not self.catalogue_certain:
            agree = "agrees with" if self.actual == self.catalogue_sha256 else "differs from"
            text += f"; {agree} the third-party SHA-256 in the catalogue (uncertain)"
        return text


def check_hash(
    path: Union[str, os.PathLike],
    catalogue_sha256: Optional[str] = None,
    catalogue_certain: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> HashCheck:
    file = Path(path)
    return HashCheck(
        path=file,
        actual=sha256_file(file, progress),
        hub_sha256=hub_recorded_sha256(file),
        catalogue_sha256=catalogue_sha256,
        catalogue_certain=catalogue_certain,
    )


def ensure_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse a download that cannot fit, before a byte is written: a disk filled by a half download
    can also break the user's other work (Slicer scenes, DICOM imports)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes + _DISK_MARGIN_BYTES:
        raise ModelError(
            f"not enough disk space for {what}: it needs {needed_bytes / 1e6:.0f} MB and {probe} has "
            f"{free / 1e6:.0f} MB free; free some space or choose another folder with --cache-dir"
        )


def download(
    repo_id: str,
    filename: str,
    cache_dir: Union[str, os.PathLike, None] = None,
    *,
    size_hint: Optional[int] = None,
    catalogue_sha256: Optional[str] = None,
    catalogue_certain: bool = False,
    progress: Progress = True,
    force: bool = False,
) -> Path:
    """Download ``repo_id/filename`` into the cache (or refresh it with ``force``) and verify it."""
    cache = _cache(cache_dir)
    what = f"{repo_id}/{filename}"
    if is_offline():
        raise ModelError(
            f"{what} is not in the model cache {cache} and HF_HUB_OFFLINE is set, so it cannot be "
            "downloaded; download it on a machine with network (medsam2 models download) and copy the "
            "cache folder, or pass --checkpoint FILE"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or None
    size, hub_sha = _remote_metadata(repo_id, filename, endpoint)
    needed = size if size is not None else size_hint
    if needed:
        ensure_free_space(cache, needed, what)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _hub_online(), _progress_bars(progress) as tqdm_class:
            kwargs: dict[str, Any] = {"cache_dir": str(cache), "force_download": force, "endpoint": endpoint}
            if tqdm_class is not None:
                kwargs["tqdm_class"] = tqdm_class
            path = Path(_hf_hub_download(repo_id, filename, **kwargs))
    except ModelError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelError(
                f"the disk filled up while downloading {what} into {cache}; free some space"
            ) from None
        raise _hub_error(exc, what, endpoint) from None
    except Exception as exc:  # the hub raises its own HTTP/offline/validation types and httpx/requests ones
        raise _hub_error(exc, what, endpoint) from None

    check = check_hash(path, catalogue_sha256, catalogue_certain)
    if hub_sha and not check.hub_sha256 and check.actual != hub_sha:
        # A cache without symlinks (Windows without developer mode) stores copies; compare with the
        # hash the hub announced for the download instead.
        check = HashCheck(path, check.actual, hub_sha, catalogue_sha256, catalogue_certain)
    if not check.ok:
        removed = remove_cached(path)
        raise ModelError(
            f"{what} failed verification: {check.problem}; "
            + ("the bad copy was removed, " if removed else "")
            + "download it again"
        )
    return path


def _hf_hub_download(repo_id: str, filename: str, **kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    return str(hf_hub_download(repo_id=repo_id, filename=filename, **kwargs))


@contextmanager
def _hub_online() -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import. Callers here have already checked the
    environment as it is now (the Slicer module or a test may have cleared it since), so let the hub
    library follow it for the duration of the download."""
    from huggingface_hub import constants

    before = getattr(constants, "HF_HUB_OFFLINE", False)
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _remote_metadata(
    repo_id: str, filename: str, endpoint: Optional[str]
) -> tuple[Optional[int], Optional[str]]:
    """Exact size and announced SHA-256 (the LFS object id) from one HEAD request."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    what = f"{repo_id}/{filename}"
    try:
        with _hub_online():
            meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, endpoint=endpoint))
    except Exception as exc:
        raise _hub_error(exc, what, endpoint) from None
    etag = (meta.etag or "").strip('"').lower()
    return meta.size, (etag if _SHA256.match(etag) else None)


def _hub_error(exc: BaseException, what: str, endpoint: Optional[str]) -> ModelError:
    name = type(exc).__name__
    where = endpoint or "https://huggingface.co"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if len(detail) > 200:
        detail = detail[:197] + "..."
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return ModelError(
            f"cannot download {what}: the hub repository is missing, private or gated ({detail})"
        )
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return ModelError(f"cannot download {what}: the file is not in the hub repository")
    if name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        return ModelError(
            f"{what} is not cached and the hub is offline; run medsam2 models download with network"
        )
    if "Consistency check failed" in detail:
        return ModelError(f"download of {what} arrived incomplete ({detail}); run the download again")
    connection_types = ("ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "TimeoutException")
    if any(kind in name for kind in connection_types) or isinstance(exc, ConnectionError):
        return ModelError(
            f"cannot reach the model hub at {where} to download {what} ({name}) and it is not cached; "
            "connect to the network, set HF_ENDPOINT to a mirror, or pass --checkpoint FILE"
        )
    return ModelError(f"download of {what} failed: {name}: {detail}")


def remove_cached(path: Union[str, os.PathLike]) -> bool:
    """Delete a cached snapshot file and the blob it links to, so a bad copy is never loaded later."""
    file = Path(path)
    removed = False
    targets = [Path(os.path.realpath(file))] if file.is_symlink() else []
    for target in [file, *targets]:
        try:
            target.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed


@contextmanager
def _progress_bars(progress: Progress) -> Iterator[Optional[type]]:
    """True: the hub's own tqdm bar on stderr. False: none. A callable: called with (bytes done,
    total) instead of a console bar (the Slicer panel's progress bar), where the hub supports it."""
    from huggingface_hub import utils as hub_utils

    was_disabled = hub_utils.are_progress_bars_disabled()
    tqdm_class: Optional[type] = None
    if callable(progress):
        if "tqdm_class" in inspect.signature(_hub_download_signature()).parameters:
            tqdm_class = _callback_tqdm(progress)
        else:
            hub_utils.disable_progress_bars()
    elif not progress:
        hub_utils.disable_progress_bars()
    try:
        yield tqdm_class
    finally:
        if not was_disabled and hub_utils.are_progress_bars_disabled():
            hub_utils.enable_progress_bars()


def _hub_download_signature() -> Callable[..., Any]:
    from huggingface_hub import hf_hub_download

    return hf_hub_download


def _callback_tqdm(callback: ProgressCallback) -> type:
    import io

    from tqdm.auto import tqdm

    class CallbackTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()  # no console output; the callback reports progress
            kwargs["disable"] = False  # a disabled tqdm stops counting, and the callback needs the count
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def update(self, n: Optional[float] = 1) -> Optional[bool]:
            result = super().update(n)
            callback(int(self.n), int(self.total) if self.total else None)
            return result

    return CallbackTqdm
