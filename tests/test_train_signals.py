"""SIGINT / SIGTERM stop training cleanly: last.pt written, exit 130 / 143, --resume reaches the
weights of an uninterrupted run (deterministic CPU, as the SIGKILL test in test_train.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from resunet import cli
from resunet.model.checkpoint import load_checkpoint
from resunet.train.config import config_from_dict
from resunet.train.signals import StopRequest, TrainingInterrupted
from resunet.train.trainer import fit
from test_train import read_metrics, tiny_config, tiny_dataset  # noqa: F401  (tiny_dataset: fixture)

# 3 epochs: 2 x 4 iterations at 32 x 32, then 1 x 3 at 48 x 48 (a stage switch after the stop)
PLAN = {"stages": [{"patch_size": [32, 32], "batch_size": 2, "epochs": 2, "iterations_per_epoch": 4},
                   {"patch_size": [48, 48], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 3}],
        "val_interval": 2}
EPOCHS = 3
# the same 3 epochs with 10x the iterations: the CLI test signals a subprocess once it sees the first
# checkpoint, and on a fast CPU the 11 iterations of PLAN that remain are done before the signal lands
CLI_PLAN = {**PLAN, "stages": [{**stage, "iterations_per_epoch": 10 * stage["iterations_per_epoch"]}
                               for stage in PLAN["stages"]]}


@pytest.fixture(autouse=True)
def sigint_delivered():
    """A shell starts background jobs with SIGINT ignored, and `StopRequest` keeps an ignored signal
    ignored (tested below). These tests need SIGINT delivered, here and in the child processes
    (which inherit an ignored SIGINT, but not a Python handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config_tree(dataset, out, cache, plan=PLAN) -> dict:
    return tiny_config(dataset, out, **plan, **{"data.cache_dir": str(cache)})


def uninterrupted(dataset, cache, out, plan=PLAN):
    """The uninterrupted run: its final checkpoint and metrics rows."""
    fit(config_from_dict(config_tree(dataset, out, cache, plan)))
    return load_checkpoint(out / "run" / "last.pt"), read_metrics(out / "run")


@pytest.fixture(scope="module")
def reference(tiny_dataset, shared_cache, tmp_path_factory):
    return uninterrupted(tiny_dataset, shared_cache, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def cli_reference(tiny_dataset, shared_cache, tmp_path_factory):
    return uninterrupted(tiny_dataset, shared_cache, tmp_path_factory.mktemp("cli_reference"), CLI_PLAN)


def assert_same_run(run, reference):
    ref_ckpt, ref_rows = reference
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == ref_ckpt["epoch"] == EPOCHS
    for name, tensor in ref_ckpt["state_dict"].items():
        assert torch.equal(tensor, ckpt["state_dict"][name]), name
    rows = read_metrics(run)
    # the same epochs with the same losses and Dice (only the timings differ)
    assert [{k: v for k, v in r.items() if k not in ("seconds", "data_wait")} for r in rows] == \
           [{k: v for k, v in r.items() if k not in ("seconds", "data_wait")} for r in ref_rows]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_a_signal_mid_epoch_saves_the_state_and_resume_continues_exactly(
        tiny_dataset, shared_cache, reference, tmp_path, monkeypatch):
    """Deterministic stop: SIGTERM raised by the 6th training step (epoch 2, iteration 2 of 4)."""
    import resunet.train.trainer as trainer

    real_step, steps = trainer.train_step, []

    def step_then_signal(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(loss)
        if len(steps) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = config_from_dict(config_tree(tiny_dataset, tmp_path, shared_cache))
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(cfg)
    # the iteration in progress finished, nothing more ran, and the previous handlers are back
    assert len(steps) == 6
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    run = tmp_path / "run"
    assert stopped.value.exit_code == 143 and stopped.value.checkpoint == run / "last.pt"
    message = str(stopped.value)
    assert "SIGTERM in epoch 2/3 after iteration 2/4" in message
    assert f"resunet train --resume {run}" in message

    ckpt = load_checkpoint(run / "last.pt")
    state = ckpt["training_state"]
    assert ckpt["epoch"] == 1 and state["iteration"] == 2
    assert state["epoch_losses"] == steps[4:6] and len(read_metrics(run)) == 1
    assert state["scheduler"]["last_epoch"] == 6  # the LR schedule stepped once per iteration done

    monkeypatch.undo()
    resumed = fit(cfg, resume=True)
    assert resumed.epochs_run == EPOCHS - 1  # the interrupted epoch counts as run here
    assert_same_run(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_train_command_stops_on_a_signal_and_resume_reaches_the_same_weights(
        tiny_dataset, shared_cache, cli_reference, tmp_path, sig):
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(config_tree(tiny_dataset, tmp_path, shared_cache, CLI_PLAN)))
    run = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err, open(tmp_path / "stdout.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "resunet", "train", "--config", str(cfg_path)],
                                stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not (run / "last.pt").exists():  # the first epoch's checkpoint
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 240 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            code = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"training stopped by {sig.name}" in stderr and f"resunet train --resume {run}" in stderr

    ckpt = load_checkpoint(run / "last.pt")  # complete and verified (checksum)
    epoch, iteration = ckpt["epoch"], ckpt["training_state"]["iteration"]
    assert 1 <= epoch < EPOCHS and len(read_metrics(run)) == epoch
    where = f"after epoch {epoch}/3" if iteration == 0 else f"in epoch {epoch + 1}/3 after iteration {iteration}/"
    assert where in " ".join(stderr.split())
    assert len(ckpt["training_state"]["epoch_losses"]) == iteration

    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--resume", str(run)])
    assert done.value.code == 0
    assert_same_run(run, cli_reference)


def test_a_second_signal_waits_for_the_save_and_otherwise_stops_at_once():
    # raise_signal runs the handler before it returns; os.kill(own pid) may be taken by another
    # thread (torch's) and handled some bytecodes later, after the assert below
    stop = StopRequest(announce=False)
    before = signal.getsignal(signal.SIGINT)
    with stop.installed():
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT  # first signal: only a request
        with stop.saving():
            signal.raise_signal(signal.SIGTERM)  # while the checkpoint is written: noted, no raise
        assert stop.signum == signal.SIGINT
        with pytest.raises(TrainingInterrupted) as forced:
            signal.raise_signal(signal.SIGINT)
        assert forced.value.exit_code == 130 and "without saving" in str(forced.value)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopRequest(announce=False).installed():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a child of ``agent_pid``), from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(
        tiny_dataset, shared_cache, tmp_path):
    """Only rank 1 gets SIGTERM; the all-reduced stop flag makes rank 0 stop too, and rank 0 saves."""
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(config_tree(tiny_dataset, tmp_path, shared_cache)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "resunet", "train"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*torchrun, "--config", str(cfg_path)], stdout=err, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 400
            while not (run / "last.pt").exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 400 s"
                time.sleep(0.05)
            rank1 = _worker_pid(proc.pid, 1)
            assert rank1 is not None
            os.kill(rank1, signal.SIGTERM)
            proc.wait(timeout=300)  # no rank left waiting in a collective
        finally:
            if proc.poll() is None:
                proc.kill()
    log = " ".join((tmp_path / "stderr.txt").read_text().split())
    assert log.count("training stopped by SIGTERM") == 2, log[-3000:]  # both ranks, same place
    # the signalled rank exits 143; torchrun then SIGTERMs the others, and rank 0 -- its stop done,
    # its handlers restored on leaving fit -- may be reported as 143 or as killed by that SIGTERM
    assert "exitcode : 143" in log, log[-3000:]
    ckpt = load_checkpoint(run / "last.pt")
    assert 1 <= ckpt["epoch"] < EPOCHS and len(read_metrics(run)) == ckpt["epoch"]
    assert len(ckpt["training_state"]["epoch_losses"]) == ckpt["training_state"]["iteration"]

    r = subprocess.run([*torchrun, "--resume", str(run)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_checkpoint(run / "last.pt")["epoch"] == EPOCHS
    assert [int(row["epoch"]) for row in read_metrics(run)] == list(range(1, EPOCHS + 1))
