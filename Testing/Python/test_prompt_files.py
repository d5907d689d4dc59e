"""Prompts from Slicer markups JSON and the simple JSON format, in RAS, LPS or voxel indices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam2 import InvalidPromptError, VolumeGeometry
from medsam2.geometry import SliceLayout
from medsam2.io.prompt_files import parse_box, parse_triplet, read_prompt_file

# anisotropic, LPS origin away from zero, rotated 90 degrees in-plane: errors in the conversions show
GEOMETRY = VolumeGeometry(spacing=(0.5, 0.8, 2.5), origin=(12.0, -30.0, 40.0), direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))
LAYOUT = SliceLayout.for_axis(2, GEOMETRY)


def lps(ijk):
    return GEOMETRY.ijk_to_lps_matrix()[:3, :3] @ np.asarray(ijk, float) + GEOMETRY.ijk_to_lps_matrix()[:3, 3]


def test_slicer_markups_points_negative_list_and_roi(tmp_path):
    pos, neg = lps([10, 20, 5]), lps([12, 22, 5])
    centre = lps([30, 40, 7])
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {"type": "Fiducial", "name": "F", "coordinateSystem": "LPS",
             "controlPoints": [{"label": "F-1", "position": list(pos), "positionStatus": "defined"},
                               {"label": "F-2", "position": [0, 0, 0], "positionStatus": "undefined"}]},
            {"type": "Fiducial", "name": "negative", "coordinateSystem": "RAS",
             "controlPoints": [{"label": "N-1", "position": [-neg[0], -neg[1], neg[2]]}]},
            {"type": "ROI", "name": "box #2", "coordinateSystem": "LPS", "center": list(centre),
             "size": [4.0, 8.0, 5.0], "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
        ],
    }
    path = tmp_path / "prompts.mrk.json"
    path.write_text(json.dumps(doc))
    objects = read_prompt_file(path, GEOMETRY, LAYOUT)
    assert np.allclose(objects[1].positive, [[10, 20, 5]]) and np.allclose(objects[1].negative, [[12, 22, 5]])
    (a, b), = objects[2].boxes
    assert a[2] == b[2] == 7  # on the ROI centre's slice
    # LPS y (8 mm) runs along +i at 0.5 mm (16 voxels), LPS x (4 mm) along -j at 0.8 mm (5 voxels)
    assert np.allclose([b[0] - a[0], b[1] - a[1]], [16.0, 5.0])
    assert np.allclose([(a[0] + b[0]) / 2, (a[1] + b[1]) / 2], [30, 40])


def test_simple_json_in_ijk_with_labels(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"coordinates": "IJK", "objects": [
        {"id": 3, "label": "liver", "points": [[1, 2, 3]], "negative_points": [[4, 5, 3]]},
        {"id": 4, "box": [[1, 1, 2], [9, 9, 4]]}]}))
    objects = read_prompt_file(path, GEOMETRY, LAYOUT)
    assert objects[3].label == "liver" and objects[3].positive == [(1.0, 2.0, 3.0)]
    assert objects[4].boxes == [((1.0, 1.0, 3.0), (9.0, 9.0, 3.0))]


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"foo": 1}', "neither"),
        ('{"objects": [{"id": 1, "negative_points": [[1, 2, 3]]}]}', "no positive point or box"),
        ('{"objects": [{"id": "x", "points": [[1, 2, 3]]}]}', "not an integer"),
        ('{"coordinates": "XYZ", "objects": [{"points": [[1, 2, 3]]}]}', "coordinate system"),
        ('{"markups": [{"type": "Curve", "controlPoints": []}]}', "not a prompt"),
    ],
)
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidPromptError, match=message):
        read_prompt_file(path, GEOMETRY, LAYOUT)


def test_missing_file_and_bad_triplets(tmp_path):
    with pytest.raises(InvalidPromptError, match="does not exist"):
        read_prompt_file(tmp_path / "none.json", GEOMETRY, LAYOUT)
    assert parse_triplet("1, -2.5,3", "--point") == (1.0, -2.5, 3.0)
    for bad in ("1,2", "a,b,c", "1,2,nan"):
        with pytest.raises(InvalidPromptError, match="three numbers"):
            parse_triplet(bad, "--point")
    with pytest.raises(InvalidPromptError, match="six numbers"):
        parse_box("1,2,3,4,5", "--box")
