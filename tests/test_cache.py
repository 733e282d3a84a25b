import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from resunet.data.cache import CachedCase, build_cache, config_fingerprint, load_cached_case
from resunet.data.datasets import Case as _Case
from resunet.data.preprocess import PreprocessConfig
from resunet.data.sampling import PatchSampler
from resunet.errors import InputError


def _write_nifti(path: Path, array: np.ndarray, spacing=(0.9, 0.9, 2.5)) -> Path:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 20.0)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _make_cases(root: Path, n: int = 2) -> list[_Case]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        img = np.zeros((24, 20, 10), np.float32)  # nibabel (x, y, z)
        img[3:21, 2:18, 1:9] = rng.normal(100, 10, size=(18, 16, 8))
        lab = np.zeros(img.shape, np.uint8)
        lab[8:14, 6:12, 3:6] = 1
        lab[10:12, 8:10, 4:5] = 2
        cases.append(
            _Case(
                f"case_{i:02d}",
                [_write_nifti(root / f"case_{i:02d}_0000.nii.gz", img)],
                _write_nifti(root / f"case_{i:02d}_seg.nii.gz", lab),
            )
        )
    return cases


class _CountingReader:
    def __init__(self):
        from resunet.data.io import read_volume

        self.read = read_volume
        self.calls = []

    def __call__(self, path):
        self.calls.append(Path(path).name)
        return self.read(path)


def _cache_mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


CONFIG = PreprocessConfig(modality="mr", target_spacing=(2.0, 1.0, 1.0))


def test_build_then_reuse(tmp_path):
    cases = _make_cases(tmp_path / "raw")
    reader = _CountingReader()
    index = build_cache(cases, CONFIG, tmp_path / "cache", progress=True, reader=reader)
    assert len(reader.calls) == 4 and index.built == ["case_00", "case_01"]
    assert index.directory == tmp_path / "cache" / config_fingerprint(CONFIG)
    stored = json.loads((index.directory / "config.json").read_text())
    assert PreprocessConfig.model_validate(stored["config"]) == CONFIG
    before = _cache_mtimes(index.directory)

    again = build_cache(cases, CONFIG, tmp_path / "cache", progress=False, reader=reader)
    assert len(reader.calls) == 4  # nothing read again
    assert again.built == [] and again.reused == ["case_00", "case_01"]
    assert _cache_mtimes(index.directory) == before  # nothing written again
    assert not [p for p in index.directory.iterdir() if p.name.startswith(".")]  # no temp files

    case = load_cached_case(index.directory, "case_00")
    assert isinstance(case, CachedCase)
    assert isinstance(case.image, np.memmap) and isinstance(case.label, np.memmap)
    assert not case.image.flags.writeable
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.shape[1:] == case.label.shape and case.image.shape[0] == 1
    assert case.spacing == (2.0, 1.0, 1.0)
    assert set(np.unique(case.label)) == {0, 1, 2}
    assert set(case.class_locations) == {1, 2}
    for value, locs in case.class_locations.items():
        assert np.all(np.asarray(case.label)[tuple(locs.T)] == value)
    assert case.properties["original_shape"] == [10, 20, 24]
    assert [c.case_id for c in index] == ["case_00", "case_01"]


def test_config_change_and_touched_file_rebuild(tmp_path):
    cases = _make_cases(tmp_path / "raw")
    reader = _CountingReader()
    first = build_cache(cases, CONFIG, tmp_path / "cache", progress=False, reader=reader)

    other = CONFIG.model_copy(update={"target_spacing": (2.5, 0.9, 0.9)})
    second = build_cache(cases, other, tmp_path / "cache", progress=False, reader=reader)
    assert second.directory != first.directory and second.built == ["case_00", "case_01"]
    assert len(reader.calls) == 8

    # touch one input (same content, new mtime): only that case is rebuilt
    label = cases[1].label
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    before = _cache_mtimes(first.directory)
    third = build_cache(cases, CONFIG, tmp_path / "cache", progress=False, reader=reader)
    assert third.built == ["case_01"] and third.reused == ["case_00"]
    assert len(reader.calls) == 10
    after = _cache_mtimes(first.directory)
    assert after["case_00_image.npy"] == before["case_00_image.npy"]
    assert after["case_01.json"] != before["case_01.json"]


def test_incomplete_case_is_rebuilt_and_not_loadable(tmp_path):
    cases = _make_cases(tmp_path / "raw", n=1)
    reader = _CountingReader()
    index = build_cache(cases, CONFIG, tmp_path / "cache", progress=False, reader=reader)
    # a crash after the arrays but before the JSON: the case must not look complete
    (index.directory / "case_00.json").unlink()
    with pytest.raises(InputError, match="not .*cached"):
        load_cached_case(index.directory, "case_00")
    again = build_cache(cases, CONFIG, tmp_path / "cache", progress=False, reader=reader)
    assert again.built == ["case_00"] and len(reader.calls) == 4
    # a truncated array is detected too
    path = index.directory / "case_00_image.npy"
    path.write_bytes(path.read_bytes()[:200])
    assert build_cache(cases, CONFIG, tmp_path / "cache", progress=False, reader=reader).built
    load_cached_case(index.directory, "case_00")


def test_default_reader_unlabelled_and_sampler_on_cache(tmp_path):
    cases = _make_cases(tmp_path / "raw")
    cases[1] = _Case(cases[1].case_id, cases[1].images, None)
    index = build_cache(cases, {"modality": "mr"}, tmp_path / "cache", progress=False)
    unlabelled = index.load("case_01")
    assert unlabelled.label is None and unlabelled.class_locations is None
    labelled = index.load("case_00")
    sampler = PatchSampler([labelled], (8, 8, 8), batch_size=2, foreground_fraction=1.0, seed=3)
    images, labels = sampler.sample()
    assert tuple(images.shape) == (2, 1, 8, 8, 8) and tuple(labels.shape) == (2, 1, 8, 8, 8)
    assert all(labels[i].sum() > 0 for i in range(2))


def test_bad_inputs(tmp_path):
    cases = _make_cases(tmp_path / "raw", n=1)
    with pytest.raises(InputError):
        build_cache([_Case("../evil", cases[0].images, None)], CONFIG, tmp_path / "c", False)
    with pytest.raises(InputError):
        build_cache([cases[0], cases[0]], CONFIG, tmp_path / "c", progress=False)
    with pytest.raises(InputError):
        build_cache([_Case("x", [tmp_path / "missing.nii.gz"], None)], CONFIG, tmp_path / "c")
