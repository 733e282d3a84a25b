"""Training precision / memory format selection (`resunet.train.precision`) and the prefetching
batch loader (`resunet.train.loader`), alone and inside `fit`."""

import json

import pytest
import torch

from resunet.losses import DiceFocalLoss
from resunet.model import load_checkpoint
from resunet.nets import build_model
from resunet.train import precision as P
from resunet.train import trainer as T
from resunet.train.config import config_from_dict
from resunet.train.loader import BatchLoader, prefetch_for
from resunet.train.precision import StepChoice, StepSettings, StepTiming
from resunet.train.steps import train_step

from test_train import tiny_config, tiny_dataset  # noqa: F401  (tiny_dataset: fixture)


def test_candidates_follow_the_hardware_and_a_forced_choice_narrows_them():
    cpu = torch.device("cpu")
    plain = P.candidate_settings(cpu, bf16_available=False)
    assert plain == [StepSettings("fp32", "contiguous"), StepSettings("fp32", "channels_last")]
    native = P.candidate_settings(cpu, bf16_available=True)
    assert [s.precision for s in native] == ["fp32", "fp32", "bf16", "bf16"]  # never fp16 on the CPU
    assert native[0] == P.REFERENCE
    assert P.candidate_settings(cpu, "bf16", "auto", bf16_available=False) == [
        StepSettings("bf16", "contiguous"), StepSettings("bf16", "channels_last")]  # forced is honoured
    assert P.candidate_settings(cpu, "fp32", "channels_last") == [StepSettings("fp32", "channels_last")]


def test_settings_apply_the_memory_format_2d_and_3d():
    cl = StepSettings("fp32", "channels_last")
    assert cl.apply(torch.zeros(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert cl.apply(torch.zeros(2, 3, 4, 8, 8)).is_contiguous(memory_format=torch.channels_last_3d)
    net = cl.apply(build_model("resunet", spatial_dims=3, in_channels=1, out_channels=2, base_channels=2, depth=2))
    assert net.encoders[0].body[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert StepSettings().dtype is None and StepSettings("bf16").dtype is torch.bfloat16
    assert StepSettings("fp16").uses_scaler and not StepSettings("bf16").uses_scaler


def _timing(precision, fmt, seconds, losses, finite=True):
    return StepTiming(StepSettings(precision, fmt), seconds, losses, finite)


def test_the_fastest_safe_candidate_wins_and_a_diverging_one_never_does():
    ref = _timing("fp32", "contiguous", 1.0, [1.0, 0.9, 0.8])
    fast_bad = _timing("bf16", "channels_last", 0.3, [1.0, 2.0, 9.0])  # fastest, but diverges
    nan = _timing("bf16", "contiguous", 0.2, [1.0, float("nan"), 0.7])
    good = _timing("fp32", "channels_last", 0.6, [1.0, 0.9, 0.81])
    settings, why = P.pick_fastest_safe([ref, fast_bad, nan, good])
    assert settings == StepSettings("fp32", "channels_last")
    assert "1.67x" in why and "bf16 / channels_last rejected" in why and "non-finite" in why
    # within MIN_GAIN of the reference: keep the reference (noise must not flip the choice)
    close = _timing("bf16", "contiguous", 0.97, [1.0, 0.9, 0.8])
    assert P.pick_fastest_safe([ref, close])[0] == P.REFERENCE
    # finite losses but non-finite weights (an overflowed update) are rejected too
    broken = _timing("bf16", "contiguous", 0.1, [1.0, 0.9, 0.8], finite=False)
    assert P.pick_fastest_safe([ref, broken])[0] == P.REFERENCE


def test_the_guard_rejects_a_real_diverging_run_on_the_same_weights_and_batches():
    torch.manual_seed(0)
    net = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=2, base_channels=4, depth=3)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):
        x = torch.randn(4, 1, 16, 16, generator=gen)
        batches.append((x, (x > 0).long()))

    def step(model, images, labels, loss_fn, optimizer, scaler, dtype, frozen=()):
        if dtype is not None:  # the injected fault: the low-precision candidate's updates explode
            for group in optimizer.param_groups:
                group["lr"] = 50.0
        return train_step(model, images, labels, loss_fn, optimizer, scaler, dtype, frozen)

    timings = P.time_candidates(net, batches, [P.REFERENCE, StepSettings("bf16", "contiguous")],
                                lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), DiceFocalLoss(), step=step)
    fp32, bf16 = timings
    assert len(fp32.losses) == len(bf16.losses) == 5 and fp32.losses[0] == pytest.approx(bf16.losses[0], rel=0.05)
    bf16.seconds = fp32.seconds / 10  # however fast it is
    assert P.pick_fastest_safe(timings)[0] == P.REFERENCE
    assert not P.precision_guard(fp32.losses, bf16.losses)[0] or not bf16.finite


def test_a_measured_choice_is_cached_per_machine_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_CACHE", str(tmp_path))
    torch.manual_seed(0)
    net = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=2, base_channels=2, depth=2)
    made = []

    def batches():
        made.append(1)
        x = torch.randn(2, 1, 8, 8)
        return [(x, (x > 0).long())] * 3

    first = P.choose_step_settings(net, batches, lambda m: torch.optim.SGD(m.parameters(), lr=0.01), DiceFocalLoss(),
                                   bf16_available=False)
    assert not first.cached and len(first.timings) == 2 and made == [1]
    again = P.choose_step_settings(net, batches, lambda m: torch.optim.SGD(m.parameters(), lr=0.01), DiceFocalLoss(),
                                   bf16_available=False)
    assert again.cached and again.settings == first.settings and made == [1, 1]  # batches made, not trained on
    table = json.loads((tmp_path / "step_settings.json").read_text())
    assert len(table) == 1 and next(iter(table.values()))["precision"] == "fp32"
    forced = P.choose_step_settings(net, batches, None, DiceFocalLoss(), precision="fp32", memory_format="contiguous")
    assert forced.settings == P.REFERENCE and "as configured" in forced.reason and made == [1, 1]


def test_prefetched_batches_are_the_synchronous_ones_and_errors_surface():
    def maker():
        gen = torch.Generator().manual_seed(5)
        return lambda: torch.randn(3, generator=gen)

    sync = list(BatchLoader(maker(), 6, prefetch=0))
    with BatchLoader(maker(), 6, prefetch=2) as loader:
        ahead = list(loader)
    assert len(ahead) == 6 and all(torch.equal(a, b) for a, b in zip(sync, ahead))
    with BatchLoader(maker(), 100, prefetch=2) as early:  # a loop that stops early stops the thread
        next(iter(early))
    assert early._thread is None
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("bad batch 3")
        return len(calls)

    with pytest.raises(ValueError, match="bad batch 3"):
        with BatchLoader(failing, 5, prefetch=1) as loader:
            assert [b for b in loader] == [1, 2]
    assert len(calls) == 3  # nothing made after the failure


def test_fit_with_prefetching_trains_exactly_as_without(tiny_dataset, tmp_path):  # noqa: F811
    weights = []
    for prefetch in (0, 2):
        tree = tiny_config(tiny_dataset, tmp_path / f"p{prefetch}", prefetch_batches=prefetch,
                           **{"stages.0.epochs": 1, "stages.1.epochs": 1, "stages.0.iterations_per_epoch": 4,
                              "stages.1.iterations_per_epoch": 2})
        T.fit(config_from_dict(tree))
        weights.append(load_checkpoint(tmp_path / f"p{prefetch}" / "run" / "last.pt")["state_dict"])
        rows = (tmp_path / f"p{prefetch}" / "run" / "metrics.csv").read_text().splitlines()
        assert "data_wait" in rows[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_prefetch_defaults_to_the_loop_on_the_cpu_and_a_thread_on_cuda(tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    assert prefetch_for(None, "cpu") == 0 and prefetch_for(None, torch.device("cuda", 0)) == 1
    assert prefetch_for(2, "cpu") == 2 and prefetch_for(0, "cuda") == 0  # a configured value is kept
    seen = []

    class Recording(BatchLoader):
        def __init__(self, make, count, prefetch=1):
            seen.append(prefetch)
            super().__init__(make, count, prefetch)

    monkeypatch.setattr(T, "BatchLoader", Recording)
    tree = tiny_config(tiny_dataset, tmp_path / "run", **{"stages.0.epochs": 1, "stages.1.epochs": 1,
                                                          "stages.0.iterations_per_epoch": 2,
                                                          "stages.1.iterations_per_epoch": 1})
    assert config_from_dict(tree).prefetch_batches is None
    T.fit(config_from_dict(tree))
    assert seen == [0, 0]  # one loader per epoch, none of them threaded on the CPU


def _spy_steps(monkeypatch):
    seen = []

    def spy(model, images, labels, loss_fn, optimizer, scaler, dtype, frozen=()):
        seen.append((dtype, images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()))
        return train_step(model, images, labels, loss_fn, optimizer, scaler, dtype, frozen)

    monkeypatch.setattr(T, "train_step", spy)
    return seen


def test_a_forced_precision_is_used_and_recorded(tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    seen = _spy_steps(monkeypatch)
    tree = tiny_config(tiny_dataset, tmp_path, precision="bf16", memory_format="channels_last",
                       **{"stages": [{"patch_size": [32, 32], "batch_size": 4, "epochs": 1, "iterations_per_epoch": 3}]})
    T.fit(config_from_dict(tree))
    assert seen == [(torch.bfloat16, True)] * 3
    record = json.loads((tmp_path / "run" / "step_settings.json").read_text())
    assert record["precision"] == "bf16" and record["memory_format"] == "channels_last"
    assert "as configured" in record["reason"]


def test_auto_measures_once_and_resume_keeps_the_runs_choice(tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    seen = _spy_steps(monkeypatch)
    measured = []

    def fake_choose(model, batches, make_optimizer, loss_fn, **kw):  # as if bf16 / channels-last won here
        images, labels = batches()[0]
        measured.append((tuple(images.shape), kw["precision"], kw["memory_format"]))
        return StepChoice(StepSettings("bf16", "channels_last"), "bf16 / channels_last: 2.00x faster (faked)")

    monkeypatch.setattr(T, "choose_step_settings", fake_choose)
    stage = {"patch_size": [32, 32], "batch_size": 4, "epochs": 1, "iterations_per_epoch": 2}
    tree = tiny_config(tiny_dataset, tmp_path, precision="auto", memory_format="auto", **{"stages": [stage]})
    T.fit(config_from_dict(tree))
    assert measured == [((4, 3, 32, 32), "auto", "auto")]  # the first stage's real batches (2.5-D: 3 slices)
    assert seen == [(torch.bfloat16, True)] * 2

    def must_not_measure(*a, **k):
        raise AssertionError("a resumed run must not choose again")

    monkeypatch.setattr(T, "choose_step_settings", must_not_measure)
    longer = tiny_config(tiny_dataset, tmp_path, precision="auto", memory_format="auto",
                         **{"stages": [{**stage, "epochs": 2}]})
    T.fit(config_from_dict(longer), resume=True)
    assert seen == [(torch.bfloat16, True)] * 4
    assert load_checkpoint(tmp_path / "run" / "last.pt")["training_state"]["step_settings"]["precision"] == "bf16"
