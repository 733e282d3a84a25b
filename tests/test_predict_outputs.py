"""`resunet predict` outputs beyond the mask: probability maps, shards of a job array, --continue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from resunet.data.io import read_volume
from resunet.errors import ConfigError
from resunet.infer.inputs import InputCase
from resunet.infer.run import output_complete, select_part
from resunet.model import ModelSpec, checkpoint_payload, save_checkpoint
from resunet.nets import build_model
from test_predict import make_checkpoint, run_cli, write_ct

RESAMPLING = {"modality": "ct", "target_spacing": [2.0, 1.0, 1.0], "crop_to_nonzero": True, "reorient": True}


def centred_checkpoint(path: Path, out_channels: int, preprocess: dict) -> Path:
    """A random 2-D model whose logits are centred per class, so its masks hold every class."""
    torch.manual_seed(1)
    net = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=out_channels, base_channels=4,
                      depth=3).eval()
    with torch.no_grad():
        net.head.weight.mul_(50.0)
        logits = net(torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
        net.head.bias -= logits.transpose(0, 1).flatten(1).median(dim=1).values
    labels = {"background": 0, "organ": 1, "lesion": 2} if out_channels == 3 else {"background": 0, "organ": 1}
    spec = ModelSpec.for_network(net, preprocess=preprocess, labels=labels,
                                 inference={"mode": "2d", "context": 0, "patch_size": [16, 16]})
    save_checkpoint(path, checkpoint_payload(spec, net.state_dict()))
    return path


@pytest.mark.parametrize("kind", ["three classes, resampled", "binary"])
def test_saved_probabilities_argmax_is_the_mask(tmp_path, kind):
    model = (centred_checkpoint(tmp_path / "m.pt", 3, RESAMPLING) if kind.startswith("three")
             else centred_checkpoint(tmp_path / "m.pt", 1, {"modality": "ct", "crop_to_nonzero": False}))
    write_ct(tmp_path / "ct.nii.gz")
    r = run_cli("predict", "-m", str(model), "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"),
                "--save-probabilities", "--backend", "eager")
    assert r.returncode == 0, r.stderr
    mask = read_volume(tmp_path / "out" / "ct.nii.gz")
    with np.load(tmp_path / "out" / "ct.npz") as saved:
        probs, spacing = saved["probabilities"], saved["spacing"]
        labels = json.loads(str(saved["labels"]))
        origin, direction = saved["origin"], saved["direction"]
    classes = 3 if kind.startswith("three") else 2
    assert probs.dtype == np.float32 and probs.shape == (classes, *mask.shape)
    assert np.array_equal(probs.argmax(axis=0), mask.array)
    assert len(np.unique(mask.array)) > 1  # a real test: more than one class predicted
    inside = probs.sum(axis=0) > 0  # outside the crop box every probability is 0 (background)
    np.testing.assert_allclose(probs.sum(axis=0)[inside], 1.0, atol=1e-5)
    np.testing.assert_allclose(spacing, mask.spacing) and np.testing.assert_allclose(origin, mask.origin)
    np.testing.assert_allclose(direction, mask.direction)
    assert set(labels.values()) == set(range(classes))


def _cases(n: int) -> list[InputCase]:
    return [InputCase(f"case_{i:03d}", [Path(f"case_{i:03d}.nii.gz")], "nifti", ".nii.gz") for i in range(n)]


def test_parts_cover_every_case_exactly_once():
    cases = _cases(11)
    shuffled = cases[::-1]
    parts = [select_part(shuffled, 3, i) for i in range(3)]
    ids = [c.case_id for part in parts for c in part]
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(ids) == len(set(ids))
    assert [len(p) for p in parts] == [4, 4, 3]
    assert [c.case_id for c in parts[1]] == ["case_001", "case_004", "case_007", "case_010"]
    with pytest.raises(ConfigError, match="--part-id must be in 0..2"):
        select_part(cases, 3, 3)


def _folder_of_cases(root: Path, n: int, shape=(64, 64, 24)) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        write_ct(root / f"case_{i:03d}.nii.gz", shape=shape, seed=i)
    return root


def test_shards_through_the_cli_write_each_case_once(tmp_path):
    model = make_checkpoint(tmp_path / "m.pt")
    cases = _folder_of_cases(tmp_path / "in", 5, shape=(20, 16, 4))
    for part in range(2):
        r = run_cli("predict", "-m", str(model), "-i", str(cases), "-o", str(tmp_path / f"part{part}"),
                    "--num-parts", "2", "--part-id", str(part), "--backend", "eager")
        assert r.returncode == 0, r.stderr
    got = [sorted(p.name for p in (tmp_path / f"part{i}").iterdir()) for i in range(2)]
    assert got == [["case_000.nii.gz", "case_002.nii.gz", "case_004.nii.gz"], ["case_001.nii.gz", "case_003.nii.gz"]]


@pytest.mark.slow
def test_continue_after_a_kill_completes_the_rest_without_redoing_any(tmp_path):
    model = make_checkpoint(tmp_path / "m.pt", mode="3d")  # 3-D windows: seconds per case
    cases = _folder_of_cases(tmp_path / "in", 6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "resunet", "predict", "-m", str(model), "-i", str(cases), "-o", str(out),
               "--backend", "eager", "--save-probabilities"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("case_*.nii.gz"))) < 2:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("case_*") if output_complete(p)}
    assert 2 <= len([n for n in done_before if n.endswith(".nii.gz")]) < 6, "the kill came too late to test"
    (out / "case_005.nii.gz").write_bytes(b"\x1f\x8b truncated")  # a damaged output is predicted again
    again = subprocess.run([*command, "--continue"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    for i in range(6):
        for suffix in (".nii.gz", ".npz"):
            assert output_complete(out / f"case_{i:03d}{suffix}")
    complete_pairs = {n[: -len(".nii.gz")] for n in done_before if n.endswith(".nii.gz")} & {
        n[: -len(".npz")] for n in done_before if n.endswith(".npz")}
    for case in complete_pairs:  # skipped, not rewritten
        for suffix in (".nii.gz", ".npz"):
            assert (out / f"{case}{suffix}").stat().st_mtime_ns == done_before[f"{case}{suffix}"]
    assert "already complete, skipped" in again.stdout
    mask = read_volume(out / "case_005.nii.gz")
    assert mask.shape == read_volume(cases / "case_005.nii.gz").shape
