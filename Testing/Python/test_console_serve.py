"""``medsam2 serve`` started as an operator starts it (the installed console script, a token file, a
local checkpoint, a free loopback port), used through the remote client, then stopped with Ctrl+C.
The remote session's masks must equal the engine's own on the same volume, model and prompts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk
from console import MEDSAM2

from medsam2.geometry import VolumeGeometry
from medsam2.remote import AuthenticationError, RemoteSession

pytest_plugins = ["console_fixtures"]  # the shared inputs of the console tests

TOKEN = "console-test-" + "x7Kp2" * 6
STARTUP_SECONDS = 300  # model load on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(console_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    token_file = folder / "token.txt"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [MEDSAM2, "serve", "--checkpoint", str(console_checkpoint), "--token-file", str(token_file)]
    command += ["--port", str(port), "--device", "cpu", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            pytest.fail(f"medsam2 serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("medsam2 serve did not answer /health")
        time.sleep(0.5)
    yield url, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_remote_session_against_the_served_checkpoint(server, console_checkpoint, ct_nifti):
    url, process = server
    image = sitk.ReadImage(str(ct_nifti))
    volume = sitk.GetArrayFromImage(image)
    geometry = VolumeGeometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    with pytest.raises(AuthenticationError):
        RemoteSession(url, "wrong-" + TOKEN, volume, geometry)
    with RemoteSession(url, TOKEN, volume, geometry, intensity="soft_tissue") as remote:
        preview = remote.add_points(1, [[18.0, 20.0, 4.0]], [1])
        remote_result = remote.propagate()
    assert preview.mask.shape == volume.shape[1:] and preview.mask.any()

    from medsam2.models.registry import load_model
    from medsam2.session import SegmentationSession

    predictor, _ = load_model(checkpoint=console_checkpoint, device="cpu")
    local = SegmentationSession(predictor, volume, geometry, intensity="soft_tissue")
    local.add_points(1, [[18.0, 20.0, 4.0]], [1])
    expected = local.propagate().masks[1]
    assert remote_result.masks[1].shape == volume.shape and remote_result.masks[1].any()
    assert np.array_equal(remote_result.masks[1], expected)

    process.send_signal(signal.SIGINT)  # Ctrl+C: uvicorn shuts down cleanly
    assert process.wait(timeout=60) == 0
