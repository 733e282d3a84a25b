"""Training engine on a tiny crop of the real MNI152 MRI (the demo's data, 48x48 in-plane)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from resunet import ResunetError
from resunet.demo import prepare_dataset
from resunet.infer.predictor import Predictor
from resunet.model.checkpoint import load_checkpoint, run_checkpoint, save_checkpoint
from resunet.model.load import model_from_checkpoint
from resunet.train.config import config_from_dict, load_config, parse_overrides
from resunet.train.stages import lr_factor, stage_for_epoch
from resunet.train.trainer import fit

BOX = (slice(90, 138), slice(70, 118))  # 48 x 48 voxels through both hemispheres' cortex and WM


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mni") / "dataset"
    return prepare_dataset(root, z_range=(70, 94), thickness=6, test_slabs=(3,), box=BOX)


def tiny_config(dataset: Path, out: Path, **changes) -> dict:
    cfg = {
        "data": {"dataset": str(dataset), "cache_dir": str(out / "cache"), "val_cases": ["mni_slab2"],
                 "preprocess": {"modality": "mr"}, "mode": "2d", "context": 1, "foreground_fraction": 0.5},
        "model": {"name": "resunet", "base_channels": 4, "depth": 3},
        "optimizer": {"lr": 0.01},
        "stages": [{"patch_size": [32, 32], "batch_size": 8, "epochs": 2, "iterations_per_epoch": 6},
                   {"patch_size": [48, 48], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 6}],
        "seed": 3,
        "deterministic": True,
        # the runs these tests compare must not depend on what a timing chose (tests/test_precision.py)
        "precision": "fp32",
        "memory_format": "contiguous",
        "output_dir": str(out / "run"),
    }
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return cfg


def read_metrics(run: Path) -> list[dict]:
    import csv

    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_training_lowers_loss_raises_dice_and_writes_the_run_folder(tiny_dataset, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_dataset, tmp_path, **{"stages.0.epochs": 4}))
    result = fit(cfg)
    run = result.run_dir
    rows = read_metrics(run)
    assert len(rows) == 5
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_dice_mean"]) > float(rows[0]["val_dice_mean"])
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pt", "best.pt", "final.pt"):
        assert (run / name).is_file(), name
    # the run's model is the end of the schedule: final.pt holds last.pt's weights, without the state
    final, last = load_checkpoint(run / "final.pt"), load_checkpoint(run / "last.pt")
    assert run_checkpoint(run) == run / "final.pt" and final["epoch"] == last["epoch"] == cfg.total_epochs
    assert final["weights_sha256"] == last["weights_sha256"] and "training_state" not in final
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the written config reproduces the run's config
    assert config_from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    # multi-stage: stage and patch size switch after the first stage's epochs
    assert [int(r["stage"]) for r in rows] == [1, 1, 1, 1, 2]
    best = load_checkpoint(run / "best.pt")
    assert best["inference"]["patch_size"] in ([32, 32], [48, 48])
    assert best["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2}
    assert "training_state" not in best and "training_state" in load_checkpoint(run / "last.pt")


def test_stage_plan_and_lr_schedule():
    cfg = config_from_dict(tiny_config(Path("."), Path("."), **{"schedule": {"kind": "poly", "warmup_iterations": 2}}))
    assert [stage_for_epoch(cfg.stages, e)[0] for e in range(3)] == [0, 0, 1]
    with pytest.raises(ValueError):
        stage_for_epoch(cfg.stages, 3)
    f = lr_factor(cfg.schedule, cfg.stages)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)  # warm-up
    assert f(2) > f(10) > f(17) > 0  # poly decay over all 18 iterations


def test_lr_schedule_restarts_at_the_given_epochs():
    """Cycles: the decay ends just before each restart epoch and starts again (warm-up first) at its
    first iteration; every cycle decays over its own iterations, across a stage boundary too."""
    from resunet.train.config import ScheduleConfig, StageConfig

    stages = [StageConfig(patch_size=[32, 32], batch_size=2, epochs=4, iterations_per_epoch=10),
              StageConfig(patch_size=[64, 64], batch_size=2, epochs=6, iterations_per_epoch=5)]
    schedule = ScheduleConfig(kind="poly", warmup_iterations=2)
    plain, cycled = lr_factor(schedule, stages), lr_factor(schedule, stages, [3, 6])
    # epoch 3 starts at iteration 30, epoch 6 at 40 + 2 * 5 = 50; the run has 70 iterations
    first_cycle = lr_factor(schedule, [StageConfig(patch_size=[32, 32], batch_size=2, epochs=3, iterations_per_epoch=10)])
    assert [cycled(i) for i in range(30)] == [first_cycle(i) for i in range(30)]
    assert cycled(29) < 0.05 and cycled(49) < 0.1 and cycled(69) < 0.1  # each cycle decays to its end
    assert cycled(30) == cycled(50) == pytest.approx(0.5) and cycled(31) == cycled(51) == pytest.approx(1.0)
    assert cycled(35) > cycled(45) and cycled(55) > cycled(65)
    assert plain(29) > 0.5  # without restarts the same iteration is mid-decay
    # restart epochs outside the run (0, or past the end) change nothing
    assert [lr_factor(schedule, stages, [0, 10, 12])(i) for i in range(70)] == [plain(i) for i in range(70)]


def test_resume_after_sigkill_gives_the_same_weights(tiny_dataset, tmp_path):
    """Kill a training process mid-run, resume it, and get bit-identical weights (deterministic CPU)."""
    import signal
    import time

    plan = {"stages": [{"patch_size": [32, 32], "batch_size": 4, "epochs": 4, "iterations_per_epoch": 3},
                       {"patch_size": [48, 48], "batch_size": 2, "epochs": 2, "iterations_per_epoch": 3}]}
    full = fit(config_from_dict(tiny_config(tiny_dataset, tmp_path / "a", **plan)))

    cfg_path = tmp_path / "b.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_dataset, tmp_path / "b", **plan)))
    run = tmp_path / "b" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "resunet", "train", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and len(read_metrics(run)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(run))
    assert 2 <= done < 6, "the run should have been killed mid-way"
    completed = load_checkpoint(run / "last.pt")["epoch"]
    resumed = fit(config_from_dict(tiny_config(tiny_dataset, tmp_path / "b", **plan)), resume=True)
    assert resumed.epochs_run == 6 - completed
    a = load_checkpoint(full.run_dir / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert [r["epoch"] for r in read_metrics(run)] == [str(e) for e in range(1, 7)]


def test_init_from_loads_matching_tensors_and_reports_skipped(tiny_dataset, tmp_path, capsys):
    src = fit(config_from_dict(tiny_config(tiny_dataset, tmp_path / "src", **{"stages": [
        {"patch_size": [32, 32], "batch_size": 4, "epochs": 1, "iterations_per_epoch": 2}]})))
    # a binary target would change the head; here the input differs: context 0 -> 1 channel in
    cfg = config_from_dict(tiny_config(
        tiny_dataset, tmp_path / "dst", **{"data.context": 0, "init_from": str(src.run_dir / "best.pt"),
                                           "freeze_encoder_epochs": 1,
                                           "stages": [{"patch_size": [32, 32], "batch_size": 4, "epochs": 1,
                                                       "iterations_per_epoch": 2}]}))
    fit(cfg)
    err = capsys.readouterr().err
    assert "skipped encoders.0.body.0.weight: shape (4, 3, 3, 3) != (4, 1, 3, 3)" in " ".join(err.split())
    src_w = load_checkpoint(src.run_dir / "best.pt")["state_dict"]
    dst_w = load_checkpoint(tmp_path / "dst" / "run" / "last.pt")["state_dict"]
    # frozen encoder (epoch 0 < freeze_encoder_epochs): transferred encoder weights unchanged
    assert torch.equal(src_w["encoders.1.body.0.weight"], dst_w["encoders.1.body.0.weight"])
    # the decoder was loaded and then trained
    assert not torch.equal(src_w["decoders.0.body.0.weight"], dst_w["decoders.0.body.0.weight"])


def test_trained_checkpoint_predicts_in_the_input_geometry(tiny_dataset, tmp_path):
    from resunet.data.io import read_volume

    run = fit(config_from_dict(tiny_config(tiny_dataset, tmp_path))).run_dir
    image = read_volume(tiny_dataset / "imagesTs" / "mni_slab3_0000.nii.gz")
    mask = Predictor.from_file(run / "best.pt").predict([image])
    assert mask.array.shape == image.array.shape and mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) <= {0, 1, 2}
    assert mask.same_geometry(image)


def test_bad_configs_fail_clearly(tmp_path):
    good = tiny_config(tmp_path, tmp_path)
    bad_key = tiny_config(tmp_path, tmp_path)
    bad_key["optimizer"]["learning_rate"] = 0.1
    with pytest.raises(ResunetError, match=r"optimizer\.learning_rate: unknown key"):
        config_from_dict(bad_key)
    bad_type = tiny_config(tmp_path, tmp_path, **{"stages.0.batch_size": "many"})
    with pytest.raises(ResunetError, match=r"stages\.0\.batch_size"):
        config_from_dict(bad_type)
    with pytest.raises(ResunetError, match="divisible by 4"):
        config_from_dict(tiny_config(tmp_path, tmp_path, **{"stages.0.patch_size": [30, 32]}))
    path = tmp_path / "cfg.yaml"
    path.write_text("data: [unclosed")
    with pytest.raises(ResunetError, match="not valid YAML"):
        load_config(path)
    path.write_text(yaml.safe_dump(good))
    cfg = load_config(path, parse_overrides(["stages.1.epochs=7", "precision=bf16"]))
    assert cfg.stages[1].epochs == 7 and cfg.precision == "bf16"
    # a config written before precision / memory_format existed still loads
    old = {k: v for k, v in good.items() if k not in ("precision", "memory_format")}
    path.write_text(yaml.safe_dump({**old, "amp": True, "channels_last": False}))
    legacy = load_config(path)
    assert legacy.precision == "bf16" and legacy.memory_format == "contiguous"
    with pytest.raises(ResunetError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_refuses_to_overwrite_an_existing_run(tiny_dataset, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_dataset, tmp_path, **{"stages": [
        {"patch_size": [32, 32], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 1}]}))
    fit(cfg)
    with pytest.raises(ResunetError, match="--resume"):
        fit(cfg)


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"state_dict": {"w": torch.ones(3)}})
    data = bytearray(path.read_bytes())
    raw = torch.ones(3).numpy().tobytes()
    i = bytes(data).find(raw)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ResunetError, match="checksum"):
        load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ResunetError, match="not a readable resunet checkpoint"):
        load_checkpoint(path)


@pytest.mark.slow
def test_two_process_ddp_with_torchrun(tiny_dataset, tmp_path):
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_dataset, tmp_path, **{"stages": [
        {"patch_size": [32, 32], "batch_size": 4, "epochs": 2, "iterations_per_epoch": 3}]})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resunet", "train", "--config", str(cfg_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["epoch"] >= 1
    assert len(read_metrics(tmp_path / "run")) == 2  # one writer: rank 0
    Predictor(model_from_checkpoint(ckpt))  # the rank-0 checkpoint loads into a model


def test_example_config_in_the_repository_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "ct_2d.yaml")
    assert cfg.stages[0].batch_size == 16 and cfg.stages[1].patch_size == [256, 256]


def test_a_run_cut_short_has_no_final_checkpoint_and_its_model_is_best(tiny_dataset, tmp_path):
    """Stopped by its time budget before the schedule's end: no final.pt; the run's model is best.pt."""
    cfg = config_from_dict(tiny_config(tiny_dataset, tmp_path, max_minutes=1e-5))
    result = fit(cfg)
    assert 1 <= result.epochs_run < cfg.total_epochs
    assert not (result.run_dir / "final.pt").exists() and run_checkpoint(result.run_dir) == result.run_dir / "best.pt"
    (result.run_dir / "best.pt").unlink()
    with pytest.raises(ResunetError, match="no final.pt or best.pt"):
        run_checkpoint(result.run_dir)


def test_a_run_behind_its_plan_trains_fewer_epochs_within_the_budget():
    from resunet.train.config import StageConfig
    from resunet.train.stages import epochs_that_fit, lr_factor, shrink_last_stages

    # on plan (10 s per epoch, 20 epochs, 200 s): nothing changes; no pace yet: nothing decided
    assert epochs_that_fit(20, 5, 50.0, 200.0, 10.0) is None
    assert epochs_that_fit(20, 1, 90.0, 200.0, None) is None
    # a slow first epoch (set-up) but on pace since: 3 epochs in 45 s, then 10 s each -> fits
    assert epochs_that_fit(20, 3, 45.0, 200.0, 8.0) is None
    # 12 s per epoch: 4 epochs took 48 s, 152 s left fit 12 more -> 16 in all
    assert epochs_that_fit(20, 4, 48.0, 200.0, 12.0) == 16
    # hopelessly late: at least one more epoch
    assert epochs_that_fit(20, 4, 199.0, 200.0, 12.0) == 5
    stages = [StageConfig(patch_size=[32, 32], batch_size=2, epochs=4),
              StageConfig(patch_size=[64, 64], batch_size=2, epochs=10, iterations_per_epoch=10)]
    shrink_last_stages(stages, 9)
    assert [s.epochs for s in stages] == [4, 5]
    from resunet.train.config import ScheduleConfig

    factor = lr_factor(ScheduleConfig(kind="poly"), stages)
    last = 4 * 50 + 5 * 10 - 1
    assert factor(last) < 0.02 and factor(0) == 1.0  # the recomputed schedule ends at the new last step
