"""RTSTRUCT output: contours in patient space that rasterise back to the mask, valid by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from dicom_series import write_ct_series
from resunet.data.io import read_volume
from resunet.data.rtstruct import mask_contours, read_rtstruct, write_rtstruct
from resunet.metrics import dice
from test_predict import make_checkpoint, run_cli

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def _labels(shape=(6, 40, 36)) -> np.ndarray:
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    organ = ((yy - 20) / 14.0) ** 2 + ((xx - 17) / 11.0) ** 2 < 1
    labels[organ & (zz >= 1) & (zz <= 4)] = 1
    labels[(((yy - 18) ** 2 + (xx - 15) ** 2) < 16) & (zz >= 2) & (zz <= 3)] = 0  # a hole in the organ
    labels[(((yy - 33) ** 2 + (xx - 30) ** 2) < 6) & (zz == 3)] = 2  # a small second label elsewhere
    labels[1, 5:7, 30:32] = 2  # and a tiny second component
    return labels


def _series(tmp_path, oblique: bool):
    direction = None
    if oblique:
        a = np.deg2rad(20)
        direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    rng = np.random.default_rng(0)
    array = rng.normal(40, 30, size=(6, 40, 36))
    write_ct_series(tmp_path / "ct", array, spacing=(2.5, 0.8, 0.7), origin=(-20.0, 10.0, -30.0), direction=direction)
    return read_volume(tmp_path / "ct")


def test_contours_of_a_square_lie_half_way_between_pixel_centres():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 2:5] = True
    (contour,) = mask_contours(mask)
    assert contour[:, 0].min() == 0.5 and contour[:, 0].max() == 3.5
    assert contour[:, 1].min() == 1.5 and contour[:, 1].max() == 4.5


@pytest.mark.parametrize("oblique", [False, True])
def test_rtstruct_rasterises_back_to_the_mask(tmp_path, oblique):
    source = _series(tmp_path, oblique)
    labels = _labels()
    path = write_rtstruct(source.with_array(labels), source, LABELS, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(str(path))
    assert ds.Modality == "RTSTRUCT" and [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "tumour"]
    sops = {str(s) for s in source.meta["sop_instance_uids"]}
    referenced = {str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
                  for roi in ds.ROIContourSequence for c in roi.ContourSequence}
    assert referenced <= sops and ds.FrameOfReferenceUID == source.meta["frame_of_reference_uid"]
    back = read_rtstruct(path, source)
    for name, value in LABELS.items():
        if value:
            assert dice(back[name], labels == value) >= 0.95
    assert np.array_equal(back["liver"], labels == 1)  # exactly, hole included


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_rtstruct_and_seg_from_predict_pass_dciodvfy(tmp_path):
    source = _series(tmp_path, oblique=True)
    model = make_checkpoint(tmp_path / "m.pt")
    for fmt in ("rtstruct", "seg"):
        r = run_cli("predict", "-m", str(model), "-i", str(tmp_path / "ct"), "-o", str(tmp_path / fmt),
                    "--dicom-format", fmt, "--backend", "eager")
        assert r.returncode == 0, r.stderr
        (written,) = list((tmp_path / fmt).glob("*.dcm"))
        check = subprocess.run(["dciodvfy", "-new", str(written)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], "\n".join(errors)
    assert source.shape == (6, 40, 36)
