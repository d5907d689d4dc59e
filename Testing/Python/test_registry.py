"""Model registry: catalogue, hub cache, safe checkpoint loading, downloads and ``medsam2 models``.

No network is reachable, so:
* checkpoints are random weights of the real sam2 configs saved in each publisher's layout
  (checkpoint_factory.py) and placed in a real huggingface_hub cache layout under a temporary folder;
* downloads go to a fake hub on 127.0.0.1 (FakeHub) through the real ``hf_hub_download``;
* models run at 128 px through ``load_model(image_size=128)``: SAM 2 weights do not depend on the
  input size (test_state_dict_does_not_depend_on_image_size), so this loads exactly the tensors a
  512/1024 px model would, without building 1024 px models on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import shutil
import socket
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

# isort: split
from medsam2.cli import models as cli_models
from medsam2.errors import ModelError
from medsam2.models import catalogue, hub, registry
from medsam2.models.build import build_predictor
from medsam2.models.catalogue import get_model
from medsam2.models.registry import load_model, resolve_checkpoint

# isort: split
from checkpoint_factory import (
    TEST_IMAGE_SIZE,
    TINY_20,
    TINY_21,
    FakeHub,
    place_in_hub_cache,
    random_model,
    save_bare,
    save_medical_sam2_2d,
    save_medical_sam2_2d_data_parallel,
    save_medical_sam2_3d,
    save_meta_layout,
    save_with_payload,
    sha256_of,
    state_dict_of,
    truncated_copy,
)

MEDSAM2_REPO, MEDSAM2_FILE = "wanglab/MedSAM2", "MedSAM2_latest.pt"
MEDICAL_REPO, MEDICAL_FILE = "jiayuanz3/MedSAM2_pretrain", "MedSAM2_pretrain.pth"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model21():
    return random_model(TINY_21, seed=0)


@pytest.fixture(scope="module")
def model20():
    return random_model(TINY_20, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model21, model20):
    """Checkpoints reused read-only by several tests (each is ~156 MB; written once)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "meta21": save_meta_layout(folder / "meta21.pt", state_dict_of(model21)),
        "meta20": save_meta_layout(folder / "meta20.pt", state_dict_of(model20)),
    }


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """Every test gets its own empty hub cache via HF_HUB_CACHE; no test sees the user's cache, a
    real endpoint, or an offline flag it did not set itself."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode plus a socket guard: any attempt to open a connection is recorded and refused."""
    attempts: list[object] = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.strip() == text and text
    return text


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == torch.float32 or not value.is_floating_point()
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


# --- image size and cache location ----------------------------------------------------------------


def test_state_dict_does_not_depend_on_image_size(model21):
    """Why tests may load catalogue models at 128 px: the same keys and shapes at 1024 px."""
    big = build_predictor(TINY_21, image_size=1024, seed=0)
    assert {k: v.shape for k, v in big.state_dict().items()} == {
        k: v.shape for k, v in model21.state_dict().items()
    }


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.default_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub.default_cache_dir() == tmp_path / "direct"


# --- loading by name from the hub cache, offline --------------------------------------------------


def test_load_default_model_by_name_offline_from_a_real_hub_cache(hub_env, files, model21, no_network):
    from huggingface_hub import scan_cache_dir

    place_in_hub_cache(hub_env, MEDSAM2_REPO, MEDSAM2_FILE, files["meta21"])
    scanned = scan_cache_dir(hub_env)  # huggingface_hub itself recognises the layout
    assert [
        (r.repo_id, sorted(f.file_name for rev in r.revisions for f in rev.files)) for r in scanned.repos
    ] == [(MEDSAM2_REPO, [MEDSAM2_FILE])]
    predictor, entry = load_model(image_size=TEST_IMAGE_SIZE)  # DEFAULT_MODEL, offline
    assert entry.name == "medsam2-latest" and entry.image_size == TEST_IMAGE_SIZE
    assert entry.licence == "CC-BY-SA-4.0"
    assert predictor.image_size == TEST_IMAGE_SIZE
    assert_same_weights(predictor, state_dict_of(model21))
    assert no_network == []


def test_cached_model_needs_no_network_even_without_the_offline_flag(hub_env, files, monkeypatch):
    """An air-gapped machine that never set HF_HUB_OFFLINE: a cached model resolves without a call."""
    place_in_hub_cache(hub_env, "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", files["meta21"])
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    path = resolve_checkpoint("sam2.1-tiny")
    assert path.name == "sam2.1_hiera_tiny.pt" and sha256_of(path) == sha256_of(files["meta21"])
    assert attempts == []


def test_bare_state_dict_layout_loads(hub_env, tmp_path, model21, no_network):
    bare = save_bare(tmp_path / "bare.pt", state_dict_of(model21))
    place_in_hub_cache(hub_env, "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", bare)
    predictor, entry = load_model("sam2.1-tiny", image_size=TEST_IMAGE_SIZE)
    assert entry.config == TINY_21
    assert_same_weights(predictor, state_dict_of(model21))


@pytest.mark.parametrize("layout", ["3d-bf16", "2d-parameter", "2d-data-parallel"])
def test_medical_sam2_layouts_load_into_sam20_tiny(layout, hub_env, tmp_path, model20, no_network):
    path = tmp_path / MEDICAL_FILE
    expected = state_dict_of(model20)
    if layout == "3d-bf16":
        save_medical_sam2_3d(path, expected)
        expected = {
            k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in expected.items()
        }
    elif layout == "2d-parameter":
        save_medical_sam2_2d(path, model20)
    else:
        save_medical_sam2_2d_data_parallel(path, model20)
        assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["model"])
    place_in_hub_cache(hub_env, MEDICAL_REPO, MEDICAL_FILE, path)
    predictor, entry = load_model("medical-sam2", image_size=TEST_IMAGE_SIZE)
    assert (entry.config, entry.sam2_version) == (TINY_20, "2.0")
    assert_same_weights(predictor, expected)
    assert all(v.dtype == torch.float32 for v in predictor.state_dict().values() if v.is_floating_point())


def test_medical_sam2_file_that_does_not_map_fails_loudly(hub_env, tmp_path, model20, no_network):
    state = state_dict_of(model20)
    state["sam_mask_decoder.iou_head.layers.0.weight"] = state.pop(
        "sam_mask_decoder.iou_prediction_head.layers.0.weight"
    )
    path = save_medical_sam2_3d(tmp_path / MEDICAL_FILE, state)
    place_in_hub_cache(hub_env, MEDICAL_REPO, MEDICAL_FILE, path)
    with pytest.raises(ModelError) as exc:
        load_model("medical-sam2", image_size=TEST_IMAGE_SIZE)
    text = assert_one_line(exc)
    assert "Medical-SAM2 keys are expected to be exactly SAM 2.0's" in text
    assert "missing sam_mask_decoder.iou_prediction_head.layers.0.weight" in text
    assert "unexpected sam_mask_decoder.iou_head.layers.0.weight" in text


def test_medical_sam2_parameter_entry_with_foreign_names_is_refused(tmp_path, model20):
    path = tmp_path / "medical.pth"
    torch.save({"model": model20.state_dict(), "parameter": {"maskmem_tpos_encoding": torch.zeros(1)}}, path)
    with pytest.raises(ModelError) as exc:
        load_model("medical-sam2", checkpoint=path, image_size=TEST_IMAGE_SIZE)
    assert "maskmem_tpos_encoding" in assert_one_line(exc) and "does not hold" in str(exc.value)


# --- bad files ------------------------------------------------------------------------------------


def test_truncated_cached_checkpoint_says_how_to_repair(hub_env, tmp_path, files, no_network):
    bad = truncated_copy(files["meta21"], tmp_path / MEDSAM2_FILE, 0.6)
    place_in_hub_cache(hub_env, MEDSAM2_REPO, MEDSAM2_FILE, bad)
    with pytest.raises(ModelError) as exc:
        load_model("medsam2-latest", image_size=TEST_IMAGE_SIZE)
    text = assert_one_line(exc)
    assert "truncated or corrupt" in text and "medsam2 models download medsam2-latest --force" in text


def test_empty_and_garbage_files_are_corrupt(tmp_path):
    empty, garbage = tmp_path / "empty.pt", tmp_path / "garbage.pt"
    empty.write_bytes(b"")
    garbage.write_bytes(b"<html>Bad gateway</html>" * 40)  # what a proxy error page saved as .pt looks like
    with pytest.raises(ModelError, match="empty"):
        load_model(checkpoint=empty)
    with pytest.raises(ModelError) as exc:
        load_model(checkpoint=garbage)
    assert "truncated or corrupt" in assert_one_line(exc)


def test_renamed_key_is_named(tmp_path, model21):
    state = state_dict_of(model21)
    state["memory_encoder.out_projection.weight"] = state.pop("memory_encoder.out_proj.weight")
    path = save_meta_layout(tmp_path / "renamed.pt", state)
    with pytest.raises(ModelError) as exc:
        load_model(checkpoint=path, image_size=TEST_IMAGE_SIZE)
    text = assert_one_line(exc)
    assert "missing memory_encoder.out_proj.weight" in text
    assert "unexpected memory_encoder.out_projection.weight" in text


def test_wrong_shape_is_named(tmp_path, model21):
    state = state_dict_of(model21)
    state["obj_ptr_proj.layers.0.weight"] = torch.zeros(128, 256)
    path = save_meta_layout(tmp_path / "shape.pt", state)
    with pytest.raises(ModelError) as exc:
        load_model(checkpoint=path, config=TINY_21, image_size=TEST_IMAGE_SIZE)
    assert "wrong shape obj_ptr_proj.layers.0.weight (128, 256) vs (256, 256)" in assert_one_line(exc)


def test_pickle_with_reduce_payload_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "payload-ran"
    path = save_with_payload(tmp_path / "evil.pt", sentinel)
    with pytest.raises(ModelError) as exc:
        load_model(checkpoint=path, config=TINY_21, image_size=TEST_IMAGE_SIZE)
    text = assert_one_line(exc)
    assert "refused" in text and "run code" in text and "mkdir" in text
    assert not sentinel.exists()
    # Control: the payload is live. Python's own unpickler (code allowed, what this project never
    # does) runs it as soon as it reaches it; torch.load is not needed to show that.
    control = tmp_path / "control-ran"
    evil = save_with_payload(tmp_path / "evil2.pt", control)
    with zipfile.ZipFile(evil) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))

    class NoStorages(pickle.Unpickler):
        def persistent_load(self, pid):
            raise EOFError("stop at the first tensor")

    with pytest.raises(EOFError):
        NoStorages(io.BytesIO(data)).load()
    assert control.is_dir()


def test_sam20_file_into_sam21_config_says_which_version_it_is(files):
    with pytest.raises(ModelError) as exc:
        load_model(checkpoint=files["meta20"], config=TINY_21, image_size=TEST_IMAGE_SIZE)
    text = assert_one_line(exc)
    assert "is a SAM 2.0 file" in text and "builds SAM 2.1" in text and f"use {TINY_20}" in text
    with pytest.raises(ModelError) as exc:
        load_model(checkpoint=files["meta21"], config=TINY_20, image_size=TEST_IMAGE_SIZE)
    assert "is a SAM 2.1 file" in assert_one_line(exc) and f"use {TINY_21}" in str(exc.value)


def test_sam20_file_cached_under_a_sam21_name_is_reported(hub_env, files, no_network):
    place_in_hub_cache(hub_env, "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", files["meta20"])
    with pytest.raises(ModelError, match="is a SAM 2.0 file"):
        load_model("sam2.1-tiny", image_size=TEST_IMAGE_SIZE)


# --- local checkpoints ----------------------------------------------------------------------------


def test_local_checkpoint_config_is_recognised_from_its_weights(files, model20):
    predictor, entry = load_model(checkpoint=files["meta20"], image_size=TEST_IMAGE_SIZE)
    assert entry.config == TINY_20 and entry.sam2_version == "2.0" and entry.is_local
    assert entry.name == "local:meta20.pt" and entry.intensity_for("CT") is None  # nothing known
    assert_same_weights(predictor, state_dict_of(model20))


def test_local_checkpoint_metadata_and_catalogue_settings(tmp_path, model21):
    own = save_meta_layout(
        tmp_path / "finetuned.pt",
        state_dict_of(model21),
        config=TINY_21,
        image_size=TEST_IMAGE_SIZE,
        intensity="lung",
    )
    _, entry = load_model(checkpoint=own)
    assert (entry.config, entry.image_size) == (TINY_21, TEST_IMAGE_SIZE)
    assert (entry.intensity.width, entry.intensity.level) == (1500.0, -600.0)
    assert entry.intensity_for("MR") == entry.intensity  # the file's own recipe, for any modality
    # A local copy of a catalogue model keeps that model's settings and licence.
    plain = save_meta_layout(tmp_path / "copy.pt", state_dict_of(model21))
    _, entry = load_model("medsam2-latest", checkpoint=plain, image_size=TEST_IMAGE_SIZE)
    assert entry.licence == "CC-BY-SA-4.0" and entry.intensity_for("CT").level == 40.0


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(checkpoint=tmp_path / "nope.pt")


# --- offline / unreachable ------------------------------------------------------------------------


def test_not_cached_and_offline_is_one_line_and_makes_no_network_call(no_network, hub_env):
    with pytest.raises(ModelError) as exc:
        load_model("medsam2-ct-lesion")
    text = assert_one_line(exc)
    assert "not in the model cache" in text and "HF_HUB_OFFLINE" in text
    assert "medsam2 models download medsam2-ct-lesion" in text
    assert no_network == []


def test_unreachable_hub_and_not_cached(monkeypatch, hub_env):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelError) as exc:
        resolve_checkpoint("sam2.1-tiny", progress=False)
    text = assert_one_line(exc)
    assert "cannot reach the model hub" in text and "not cached" in text
    assert not any(hub_env.rglob("*.pt"))


# --- downloads through the real hf_hub_download from a loopback hub -------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def test_download_then_offline_load(fake_hub, files, model21, hub_env, monkeypatch):
    fake_hub.add(MEDSAM2_REPO, MEDSAM2_FILE, files["meta21"].read_bytes())
    seen = []
    path = resolve_checkpoint("medsam2-latest", progress=lambda done, total: seen.append((done, total)))
    size = files["meta21"].stat().st_size
    assert path.is_relative_to(hub_env) and sha256_of(path) == sha256_of(files["meta21"])
    assert hub.hub_recorded_sha256(path) == sha256_of(files["meta21"])
    assert seen and seen[-1] == (size, size)
    gets = len(fake_hub.gets())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictor, _ = load_model("medsam2-latest", image_size=TEST_IMAGE_SIZE)
    assert_same_weights(predictor, state_dict_of(model21))
    assert len(fake_hub.gets()) == gets  # the second use downloaded nothing


def test_dropped_connection_is_resumed_with_a_range_request(fake_hub, hub_env):
    """huggingface_hub resumes from the last whole chunk it wrote; the registry must not defeat that
    (no force_download, no deleting its temporary file)."""
    from huggingface_hub import constants

    chunk = constants.DOWNLOAD_CHUNK_SIZE
    payload = os.urandom(chunk * 5 // 2)
    fake_hub.add("facebook/sam2-hiera-tiny", "sam2_hiera_tiny.pt", payload)
    fake_hub.drop_first_get_after = chunk * 3 // 2
    path = resolve_checkpoint("sam2-tiny", progress=False)
    assert path.read_bytes() == payload
    ranges = [r[2] for r in fake_hub.gets()]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    resumed_at = int(ranges[1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= fake_hub.drop_first_get_after


def test_download_whose_bytes_do_not_match_the_hub_sha256_is_removed(fake_hub, hub_env, monkeypatch):
    fake_hub.add(
        "facebook/sam2-hiera-small", "sam2_hiera_small.pt", os.urandom(100_000), announce_sha="ab" * 32
    )
    with pytest.raises(ModelError) as exc:
        resolve_checkpoint("sam2-small", progress=False)
    text = assert_one_line(exc)
    assert "failed verification" in text and "does not match the hub's abababab" in text
    assert registry.cached_path("sam2-small") is None
    assert not [p for p in hub_env.rglob("*") if p.is_file() and p.stat().st_size == 100_000]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the model cache"):  # the bad copy is never loaded later
        resolve_checkpoint("sam2-small")


def test_download_that_differs_from_a_certain_catalogue_sha256_is_refused(fake_hub, monkeypatch):
    entry = get_model("sam2.1-tiny")
    monkeypatch.setitem(
        catalogue._CATALOGUE, entry.name, dataclasses.replace(entry, sha256="cd" * 32, sha256_certain=True)
    )
    fake_hub.add(entry.repo_id, entry.filename, os.urandom(50_000))
    with pytest.raises(ModelError) as exc:
        resolve_checkpoint("sam2.1-tiny", progress=False)
    assert "does not match the publisher's cdcdcdcd" in assert_one_line(exc)
    assert registry.cached_path("sam2.1-tiny") is None


def test_not_enough_disk_space_is_refused_before_downloading(fake_hub, hub_env, monkeypatch):
    """A real full disk cannot be made safely in a test; the check runs before any byte is written,
    from the size the hub announces, so faking the free space that shutil.disk_usage reports tests it."""
    fake_hub.add("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt", os.urandom(200_000))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ModelError) as exc:
        resolve_checkpoint("sam2.1-large", progress=False)
    assert "not enough disk space" in assert_one_line(exc)
    assert fake_hub.gets() == [] and not any(p.is_file() for p in hub_env.rglob("*"))


def test_disk_filling_up_during_download_is_one_line(fake_hub, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    fake_hub.add("facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt", os.urandom(10_000))
    monkeypatch.setattr(hub, "_hf_hub_download", full)  # the hub's write fails as on a full disk
    with pytest.raises(ModelError, match="disk filled up"):
        resolve_checkpoint("sam2.1-small", progress=False)


def test_file_missing_from_the_hub_repository(fake_hub):
    with pytest.raises(ModelError) as exc:
        resolve_checkpoint("sam2-base-plus", progress=False)
    text = assert_one_line(exc)
    assert (
        "facebook/sam2-hiera-base-plus/sam2_hiera_base_plus.pt" in text
        and "not in the hub repository" in text
    )


# --- medsam2 models list|download|verify ----------------------------------------------------------


def run_cli(argv, capsys):
    code = cli_models.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_list_shows_cached_state_size_and_licence(hub_env, files, capsys):
    place_in_hub_cache(hub_env, MEDSAM2_REPO, MEDSAM2_FILE, files["meta21"])
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("medsam2-latest *"))
    assert "~156 MB" in row and " yes " in row and "CC-BY-SA-4.0" in row and "research and education" in row
    medical = next(line for line in out.splitlines() if line.startswith("medical-sam2"))
    assert " no " in medical and "unspecified" in medical
    code, out, _ = run_cli(["list", "--json"], capsys)
    models = {m["name"]: m for m in json.loads(out)["models"]}
    assert models["medsam2-latest"]["cached"] is True and models["medsam2-latest"]["default"] is True
    assert models["sam2.1-large"]["cached"] is False and models["sam2.1-large"]["licence"] == "Apache-2.0"


def test_cli_verify_rehashes_and_detects_a_corrupted_blob(hub_env, tmp_path, model20, files, capsys):
    place_in_hub_cache(hub_env, MEDSAM2_REPO, MEDSAM2_FILE, files["meta21"])
    medical = save_medical_sam2_3d(tmp_path / MEDICAL_FILE, state_dict_of(model20))
    place_in_hub_cache(hub_env, MEDICAL_REPO, MEDICAL_FILE, medical)
    code, out, _ = run_cli(["verify"], capsys)
    assert code == 0
    assert "medsam2-latest: ok, matches hub SHA-256" in out
    assert "medical-sam2: ok, matches hub SHA-256; differs from the third-party SHA-256" in out
    # Flip one byte of the cached blob in place (bit rot, a bad copy onto an air-gapped machine).
    blob = Path(os.path.realpath(registry.cached_path("medsam2-latest")))
    with open(blob, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    code, out, _ = run_cli(["verify", "medsam2-latest"], capsys)
    assert code == cli_models.EXIT_MODEL
    assert "medsam2-latest: FAILED, SHA-256" in out and "does not match the hub's" in out
    assert "medsam2 models download medsam2-latest --force" in out


def test_cli_verify_load_and_local_checkpoint(hub_env, files, capsys):
    place_in_hub_cache(hub_env, "facebook/sam2-hiera-tiny", "sam2_hiera_tiny.pt", files["meta21"])
    code, out, _ = run_cli(["verify", "--load", "sam2-tiny"], capsys)
    assert code == cli_models.EXIT_MODEL and "sam2-tiny: FAILED" in out and "is a SAM 2.1 file" in out
    code, out, _ = run_cli(["verify", "--checkpoint", str(files["meta20"])], capsys)
    assert code == 0 and f"loads into {TINY_20}" in out


def test_cli_errors_are_one_line_with_exit_code_3(no_network, capsys):
    code, out, err = run_cli(["download", "medsam2-us-heart"], capsys)
    assert code == cli_models.EXIT_MODEL and out == ""
    assert err.count("\n") == 1 and err.startswith(
        "medsam2: error: model medsam2-us-heart is not in the model cache"
    )
    code, _, err = run_cli(["download", "medsam-latest"], capsys)
    assert code == cli_models.EXIT_MODEL and "did you mean medsam2-latest" in err
    assert no_network == []


def test_cli_download_with_the_main_cli_shared_options(fake_hub, capsys):
    """The main CLI passes its shared --json/--quiet options as parents; they must not clash."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    common.add_argument("--quiet", action="store_true")
    parser = argparse.ArgumentParser(prog="medsam2")
    handler = cli_models.register(parser.add_subparsers(dest="command"), common)
    payload = os.urandom(20_000)
    fake_hub.add("facebook/sam2-hiera-large", "sam2_hiera_large.pt", payload)
    args = parser.parse_args(["models", "download", "sam2-large", "--json"])
    out = io.StringIO()
    assert handler(args, out) == 0
    result = json.loads(out.getvalue())
    assert result["ok"] and Path(result["models"][0]["path"]).read_bytes() == payload
