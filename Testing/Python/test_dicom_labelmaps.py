"""Slicer .seg.nrrd and NIfTI label maps, read back by Slicer's own segmentation storage node (slicer-core)
and by nibabel, on an oblique grid so that any axis or orientation mix-up shows."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import rotation

from medsam2.errors import InvalidVolumeError
from medsam2.geometry import VolumeGeometry
from medsam2.io.seg_nrrd import assign_layers, write_seg_nrrd
from medsam2.io.segments import Segment
from medsam2.io.volumes import labelmap_array, write_nifti_labelmap

GEOMETRY = VolumeGeometry((1.5, 2.0, 2.5), (10.0, -20.0, 30.0), tuple(rotation(20.0, -10.0, 30.0).ravel()))
SHAPE = (12, 20, 16)


def box(k, j, i) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[k[0] : k[1], j[0] : j[1], i[0] : i[1]] = 1
    return mask


@pytest.fixture(scope="module")
def slicer_reader():
    """Read a .seg.nrrd the way Slicer does: converter rules registered first (as at Slicer start-up),
    then vtkMRMLSegmentationStorageNode.ReadData into a segmentation node."""
    slicer = pytest.importorskip(
        "slicer", reason="slicer-core (PyPI) is needed to read .seg.nrrd as Slicer does"
    )
    import vtk
    from vtk.util import numpy_support

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        "vtkBinaryLabelmapToClosedSurfaceConversionRule",
        "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    ):
        factory.RegisterConverterRule(getattr(slicer, rule)())

    def read(path):
        scene = slicer.vtkMRMLScene()
        node = slicer.vtkMRMLSegmentationNode()
        scene.AddNode(node)
        storage = slicer.vtkMRMLSegmentationStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(path))
        assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
        segmentation = node.GetSegmentation()
        out = []
        inverse = np.linalg.inv(GEOMETRY.ijk_to_ras_matrix())
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetSegment(segmentation.GetNthSegmentID(n))
            image = segment.GetRepresentation("Binary labelmap")
            matrix = vtk.vtkMatrix4x4()
            image.GetImageToWorldMatrix(matrix)
            image_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            # Slicer's voxel grid must be ours, shifted by the stored extent only.
            np.testing.assert_allclose(inverse @ image_to_ras, np.eye(4), atol=1e-6)
            x0, x1, y0, y1, z0, z1 = image.GetExtent()
            dims = image.GetDimensions()
            scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
            full = np.zeros(SHAPE, dtype=bool)
            if x1 >= x0:
                full[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = scalars == segment.GetLabelValue()
            tag = vtk.reference("")
            segment.GetTag("TerminologyEntry", tag)
            out.append((segment.GetName(), tuple(segment.GetColor()), full, str(tag)))
        return out

    return read


def test_seg_nrrd_read_by_slicer_with_overlap(tmp_path, slicer_reader):
    liver = box((2, 6), (3, 9), (4, 10))
    tumor = box((4, 8), (5, 12), (6, 14))  # overlaps the liver: goes to a second layer
    kidney = box((9, 11), (15, 18), (1, 3))  # overlaps nothing: shares the first layer
    segments = [Segment(liver, "Liver"), Segment(tumor, "liver tumour"), Segment(kidney, "Kidney left")]
    path = write_seg_nrrd(tmp_path / "result.seg.nrrd", segments, GEOMETRY)
    assert [p.name for p in tmp_path.iterdir()] == ["result.seg.nrrd"]
    assert b"dimension: 4" in path.read_bytes()[:400]
    read = slicer_reader(path)
    assert [name for name, *_ in read] == ["Liver", "liver tumour", "Kidney left"]
    np.testing.assert_allclose(read[0][1], (221 / 255, 130 / 255, 101 / 255), atol=1e-5)
    np.testing.assert_allclose(read[1][1], (255 / 255, 50 / 255, 50 / 255), atol=1e-5)
    for (_, _, voxels, _), mask in zip(read, [liver, tumor, kidney]):
        np.testing.assert_array_equal(voxels, mask.astype(bool))
    assert "SCT^10200004^Liver" in read[0][3]
    assert "SCT^108369006^Neoplasm" in read[1][3] and "SCT^10200004^Liver" in read[1][3]
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in read[2][3]


def test_seg_nrrd_single_layer_and_unknown_label(tmp_path, slicer_reader):
    a, b = box((0, 3), (0, 4), (0, 5)), box((6, 12), (10, 20), (8, 16))
    path = write_seg_nrrd(tmp_path / "two.seg.nrrd", [Segment(a, "ROI A"), Segment(b, "ROI B")], GEOMETRY)
    assert b"dimension: 3" in path.read_bytes()[:400]
    read = slicer_reader(path)
    assert [r[0] for r in read] == ["ROI A", "ROI B"]
    assert read[0][1] != read[1][1]  # palette colours differ for unknown labels
    np.testing.assert_array_equal(read[1][2], b.astype(bool))
    assert "SCT^85756007^Tissue" in read[0][3]


def test_assign_layers_minimal():
    a, b, c = box((0, 4), (0, 4), (0, 4)), box((2, 6), (2, 6), (2, 6)), box((8, 10), (8, 10), (8, 10))
    assert assign_layers([a != 0, b != 0, c != 0]) == [0, 1, 0]


def test_nifti_labelmap_geometry_by_nibabel(tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel (PyPI) reads the NIfTI independently")
    a, b = box((0, 3), (0, 4), (0, 5)), box((6, 12), (10, 20), (8, 16))
    path = write_nifti_labelmap(
        tmp_path / "labels.nii.gz", [Segment(a, "liver"), Segment(b, "spleen")], GEOMETRY
    )
    image = nib.load(str(path))
    # nibabel: data [i, j, k] and an affine in RAS; it must be Slicer's IJKToRAS of the same grid.
    np.testing.assert_allclose(image.affine, GEOMETRY.ijk_to_ras_matrix(), atol=1e-4)
    data = np.asarray(image.dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(data, a * 1 + b * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_labelmap_overlap_policy(tmp_path):
    a, b = box((0, 4), (0, 4), (0, 4)), box((2, 6), (2, 6), (2, 6))
    with pytest.raises(InvalidVolumeError, match="overlap in 8 voxel"):
        write_nifti_labelmap(tmp_path / "x.nii.gz", [Segment(a, "A"), Segment(b, "B")], GEOMETRY)
    assert list(tmp_path.iterdir()) == []
    labels = labelmap_array([Segment(a, "A"), Segment(b, "B")], SHAPE, overlap="later_wins")
    assert labels[3, 3, 3] == 2 and labels[0, 0, 0] == 1


def test_bad_paths_and_masks(tmp_path):
    a = box((0, 4), (0, 4), (0, 4))
    with pytest.raises(InvalidVolumeError, match="must end in .seg.nrrd"):
        write_seg_nrrd(tmp_path / "x.nrrd", [Segment(a, "A")], GEOMETRY)
    with pytest.raises(InvalidVolumeError, match="not binary"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", [Segment(a * 0.5, "A")], GEOMETRY)
    with pytest.raises(InvalidVolumeError, match="has shape"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", [Segment(a, "A"), Segment(a[:2], "B")], GEOMETRY)
    with pytest.raises(Exception, match="does not exist"):
        write_seg_nrrd(tmp_path / "missing" / "x.seg.nrrd", [Segment(a, "A")], GEOMETRY)
    assert list(tmp_path.iterdir()) == []
