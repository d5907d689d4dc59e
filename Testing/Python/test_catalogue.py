"""The model catalogue (medsam2.models.catalogue): names, licences, configs and intensity recipes, as data.

The catalogue imports no torch (the Slicer panel lists it before anything heavy is installed); these
tests check its entries against sam2's own hub names and packaged configs.
"""

from __future__ import annotations

import pytest
from checkpoint_factory import TINY_20, TINY_21

from medsam2.errors import ModelError
from medsam2.intensity import IntensityPreparation
from medsam2.models.build import compose_model_config
from medsam2.models.catalogue import DEFAULT_MODEL, get_model, list_models

MEDSAM2_REPO = "wanglab/MedSAM2"


def test_catalogue_matches_sam2_hub_names_and_packaged_configs():
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    meta = {e.repo_id: e for e in list_models() if e.repo_id and e.repo_id.startswith("facebook/")}
    assert set(meta) == set(HF_MODEL_ID_TO_FILENAMES)
    for repo, (config, filename) in HF_MODEL_ID_TO_FILENAMES.items():
        assert (meta[repo].config, meta[repo].filename) == (config, filename)
        assert meta[repo].licence == "Apache-2.0" and meta[repo].image_size == 1024
        assert meta[repo].sam2_version == ("2.1" if "sam2.1" in repo else "2.0")


def test_every_entry_is_complete_and_its_config_composes():
    names = [e.name for e in list_models()]
    assert len(names) == len(set(names)) and DEFAULT_MODEL in names
    expected = {
        "MedSAM2_latest.pt", "MedSAM2_2411.pt", "MedSAM2_CTLesion.pt", "MedSAM2_MRI_LiverLesion.pt",
        "MedSAM2_US_Heart.pt", "medsam2_FLARE25_RECIST_baseline.pt",
    }  # fmt: skip
    assert {e.filename for e in list_models() if e.repo_id == MEDSAM2_REPO} == expected
    for entry in list_models():
        cfg = compose_model_config(entry.config, image_size=entry.image_size)
        assert cfg.model.image_size == entry.image_size
        assert isinstance(entry.intensity, IntensityPreparation)
        for modality, _ in entry.modality_intensity:
            assert isinstance(entry.intensity_for(modality), IntensityPreparation)
        assert entry.licence and entry.size_bytes and entry.size_bytes > 50e6
        assert entry.sha256 is None or (len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0)
        assert entry.trained_intensity


def test_medsam2_runs_sam21_tiny_at_512_with_exactly_its_two_config_changes():
    """bowang-lab's sam2.1_hiera_t512.yaml differs from the packaged 2.1 tiny config in image_size
    and the RoPE grid; the registry derives it instead of shipping a copy."""
    from omegaconf import OmegaConf

    entry = get_model("medsam2-latest")
    assert (entry.config, entry.image_size, entry.sam2_version) == (TINY_21, 512, "2.1")
    ours = OmegaConf.to_container(compose_model_config(entry.config, image_size=512))
    packaged = OmegaConf.to_container(compose_model_config(entry.config))

    def diff(a, b, path=""):
        if isinstance(a, dict):
            return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{path}.{k}")]
        return [path] if a != b else []

    assert sorted(diff(ours, packaged)) == [
        ".model.image_size",
        ".model.memory_attention.layer.cross_attention.feat_sizes",
        ".model.memory_attention.layer.self_attention.feat_sizes",
    ]
    assert ours["model"]["memory_attention"]["layer"]["self_attention"]["feat_sizes"] == [32, 32]


def test_licences_and_intensity_defaults():
    latest = get_model("medsam2-latest")
    assert "CC-BY-SA-4.0" in latest.licence_text and "research and education" in latest.licence_text
    medical = get_model("medical-sam2")
    assert medical.licence == "unspecified" and "no licence" in medical.licence_note
    assert (medical.config, medical.image_size, medical.key_mapping) == (TINY_20, 1024, "medical-sam2")
    assert medical.sha256 and medical.sha256_certain is False  # quoted by a third party: not enforced
    ct, mr = latest.intensity_for("CT"), latest.intensity_for("mr")
    assert (ct.mode, ct.width, ct.level) == ("window", 400.0, 40.0)
    assert (mr.mode, mr.lower_percentile, mr.upper_percentile) == ("percentile", 0.5, 99.5)
    assert get_model("medsam2-mri-liver-lesion").intensity.mode == "percentile"
    # No modality (a NIfTI file) or one the recipe does not cover: the caller decides from the data.
    assert latest.intensity_for("") is None and latest.intensity_for("PT") is None


def test_names_aliases_and_unknown_names():
    assert get_model("wanglab/MedSAM2").name == "medsam2-latest"
    assert get_model("facebook/sam2.1-hiera-tiny").name == "sam2.1-tiny"
    assert get_model("SAM2-Large").name == "sam2-large"
    assert get_model("MedSAM2_pretrain.pth").name == "medical-sam2"
    with pytest.raises(ModelError) as exc:
        get_model("medsam2-latst")
    text = str(exc.value)
    assert "\n" not in text and "unknown model 'medsam2-latst'" in text and "medsam2-latest" in text
