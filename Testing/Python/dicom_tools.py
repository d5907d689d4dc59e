"""Independent checkers for the DICOM tests: dicom3tools' ``dciodvfy``, dcmqi's ``segimage2itkimage`` and
a throw-away Orthanc server. Each helper skips the calling test, naming the package to install, when its
tool is absent (CI installs them in .ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

ORTHANC_DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy reports for ``path`` (warnings are allowed)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


@dataclass
class DcmqiSegment:
    array: np.ndarray  # [k, j, i]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    attributes: dict[str, Any]


def venv_tool(name: str) -> Optional[str]:
    """A console script on PATH or next to this interpreter (`make test` runs .venv/bin/pytest without
    activating the venv, so pip-installed tools such as dcmqi's are not on PATH there)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def dcmqi_read(seg_path: Path, out_dir: Path) -> list[DcmqiSegment]:
    """Segments of a DICOM-SEG as dcmqi's segimage2itkimage reconstructs them (one NRRD per segment)."""
    exe = venv_tool("segimage2itkimage")
    if exe is None:
        pytest.skip("segimage2itkimage not installed (PyPI package dcmqi)")
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [exe, "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir), "-t", "nrrd"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"segimage2itkimage failed: {run.stdout[-2000:]} {run.stderr[-2000:]}"
    meta = json.loads((out_dir / "meta.json").read_text())
    segments = []
    for group in meta["segmentAttributes"]:
        for attrs in group:
            image = sitk.ReadImage(str(out_dir / f"{attrs['labelID']}.nrrd"))
            segments.append(
                DcmqiSegment(
                    sitk.GetArrayFromImage(image),
                    image.GetSpacing(),
                    image.GetOrigin(),
                    image.GetDirection(),
                    attrs,
                )
            )
    return segments


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen[bytes]
    log: Path
    credentials: Optional[tuple[str, str]] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, path: str, data: Optional[bytes] = None, method: Optional[str] = None) -> Any:
        """Orthanc's own REST API (not DICOMweb): the tests' view of what the server stored."""
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if self.credentials:
            import base64

            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        content_type = response.headers.get("Content-Type", "")
        return json.loads(body) if "json" in content_type else body

    def upload(self, path: Path) -> None:
        self.rest("/instances", data=path.read_bytes(), method="POST")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_orthanc(workdir: Path, *, aet: str = "ORTHANC", refuse_unknown: bool = False) -> Orthanc:
    """Start Orthanc on loopback ports with its own storage in ``workdir``; not a system service.

    ``refuse_unknown``: HTTP needs a user/password and C-STORE from unregistered modalities is refused,
    i.e. a PACS that does not know us.
    """
    # Debian installs it in /usr/sbin, which a non-root PATH often lacks.
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if exe is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    plugin = next((p for p in ORTHANC_DICOMWEB_PLUGINS if os.path.exists(p)), None)
    if plugin is None:
        pytest.skip("Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config: dict[str, Any] = {
        "Name": f"medsam2-test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": True,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
        "SaveJobs": False,
    }
    credentials = None
    if refuse_unknown:
        credentials = ("medsam2", "not-the-default")
        config.update(
            AuthenticationEnabled=True,
            RegisteredUsers={credentials[0]: credentials[1]},
            DicomAlwaysAllowStore=False,
            DicomModalities={},
        )
    else:
        config.update(AuthenticationEnabled=False, DicomAlwaysAllowStore=True)
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    log = workdir / "orthanc.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen([exe, str(config_path)], stdout=fh, stderr=subprocess.STDOUT, cwd=workdir)
    server = Orthanc(http_port, dicom_port, aet, process, log, credentials)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited at start: {log.read_text()[-2000:]}")
        try:
            server.rest("/system")
            with socket.create_connection(("127.0.0.1", dicom_port), timeout=1):
                return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not start within 60 s: {log.read_text()[-2000:]}")
