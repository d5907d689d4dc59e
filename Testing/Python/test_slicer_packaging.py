"""The extension's description files against what the Slicer Extensions Index checks
(Slicer/ExtensionsIndex scripts/check_description_files.py, and the catalog entry schema
Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json in Slicer). That script clones the
repository and downloads the schema, the icon and the screenshots, so it cannot run offline: the
same fields are checked here from the files, and the screenshot, which it requires and which does
not exist yet, must be named as an open item of the release checklist."""

from __future__ import annotations

import json
import re
import urllib.parse

from slicer_scene import MODULE_DIR, ROOT

from MedSAM2SlicerLib import versions

EXTENSION = "MedSAM2Slicer"
# The schema's properties and their types; "$schema", "category" and "scm_url" are required.
SCHEMA = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
}  # fmt: skip
# Categories in the checker's ACCEPTED_EXTENSION_CATEGORIES that this extension could use.
ACCEPTED_CATEGORIES = {"Segmentation", "Quantification", "Analysis", "Remote"}
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")


def _entry() -> dict:
    return json.loads((ROOT / f"{EXTENSION}.json").read_text(encoding="utf-8"))


def test_catalog_entry_follows_the_schema_and_the_index_rules():
    raw = (ROOT / f"{EXTENSION}.json").read_bytes()
    assert b"\r" not in raw, "LF line endings only"
    entry = _entry()
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= set(SCHEMA), f"properties the schema forbids: {set(entry) - set(SCHEMA)}"
    for key, kind in SCHEMA.items():
        if key in entry:
            assert isinstance(entry[key], kind), key
    assert entry["scm_type"] in ("git", "local") and 1 <= entry["tier"] <= 5
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert not EXTENSION.lower().startswith("slicer"), "the extension's name must not start with Slicer"
    url = entry["scm_url"]
    assert urllib.parse.urlsplit(url).scheme in ("git", "https")
    repository = urllib.parse.urlsplit(url.strip("/")).path.split("/")[-1].removesuffix(".git")
    assert repository.startswith(REPOSITORY_PREFIXES), f"repository {repository!r} must start with Slicer"
    assert entry["build_dependencies"] == ["PyTorch"]


def test_cmake_description_matches_the_entry_and_the_checker_patterns():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", cmake, re.IGNORECASE)
    assert project and project[0] == EXTENSION, "project() must be the extension's (the .json file's) name"
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake)
    assert icon and icon[0].startswith("https://") and icon[0].endswith(".png")
    assert icon[0].endswith("/Resources/Icons/MedSAM2Slicer-extension.png")
    assert (ROOT / "Resources" / "Icons" / "MedSAM2Slicer-extension.png").is_file()
    repository = re.findall(r'set\(MEDSAM2SLICER_REPOSITORY "([^"]+)"\)', cmake)[0]
    assert _entry()["scm_url"] == f"{repository}.git"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in cmake and 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    assert f"Slicer {versions.MINIMUM_SLICER_TEXT} or later" in cmake
    # The checker requires a screenshot. None is faked: the release checklist keeps it open.
    assert re.search(r'set\(EXTENSION_SCREENSHOTURLS ""\)', cmake)
    readme = (MODULE_DIR / "README.md").read_text(encoding="utf-8")
    assert "EXTENSION_SCREENSHOTURLS" in readme and "- [ ]" in readme


def test_the_legacy_s4ext_says_the_same():
    s4ext = dict(
        line.split(" ", 1) if " " in line else (line, "")
        for line in (ROOT / f"{EXTENSION}.s4ext").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert s4ext["scmurl"] == _entry()["scm_url"] and s4ext["depends"] == "PyTorch"
    assert s4ext["category"] == _entry()["category"]
    assert f"Slicer {versions.MINIMUM_SLICER_TEXT} or later" in s4ext["description"]


def test_an_apache_licence_at_the_root_matching_pyproject():
    found = [name for name in LICENSE_NAMES if (ROOT / name).is_file()]
    assert found == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_the_supported_slicer_is_declared_everywhere_users_look():
    needed = f"Slicer {versions.MINIMUM_SLICER_TEXT}"
    assert needed in (MODULE_DIR / "README.md").read_text(encoding="utf-8")
    assert "versions.MINIMUM_SLICER_TEXT" in (MODULE_DIR / "MedSAM2Slicer.py").read_text(encoding="utf-8")
