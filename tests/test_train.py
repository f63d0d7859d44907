"""The training engine: metrics per epoch, early stopping, checkpoints and exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pairnet.data.augment import augment_batch
from pairnet.errors import PairnetError
from pairnet.models import create_model
from pairnet.train import Callback, fit, load_checkpoint, pick_device, predict_proba
from pairnet.train.losses import focal_loss

from conftest import small_config

EPOCH_KEYS = {"train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "val_precision", "val_recall", "val_auc",
              "lr", "grad_norm", "epoch_seconds", "pairs_per_s"}


_cfg = small_config


class Recorder(Callback):
    def __init__(self):
        self.epochs, self.checkpoints, self.result = [], [], None

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, metrics))

    def on_checkpoint(self, path, epoch):
        self.checkpoints.append(epoch)

    def on_fit_end(self, result):
        self.result = result


def test_fit_logs_every_metric_each_epoch(splits, tmp_path):
    cfg = _cfg()
    rec = Recorder()
    model = create_model(cfg.model_name, **cfg.model_overrides())
    result = fit(model, *splits, cfg, device=pick_device("cpu"), callbacks=[rec], checkpoint_path=tmp_path / "c.pt")
    assert [e for e, _ in rec.epochs] == [1, 2, 3, 4]
    for _, metrics in rec.epochs:
        assert EPOCH_KEYS <= set(metrics)
        assert all(np.isfinite(v) for k, v in metrics.items() if k != "val_auc")
    assert rec.checkpoints == [1, 2, 3, 4] and rec.result is result
    assert result.best_val_acc == max(m["val_acc"] for _, m in rec.epochs)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["epoch"] == 4 and ckpt["config"]["model_name"] == "compare_cnn" and len(ckpt["history"]) == 4


def test_resume_reaches_same_final_metrics(splits, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparison: one intra-op thread on both paths
    try:
        dev = pick_device("cpu")
        cfg = _cfg(epochs=4, augment=True, scheduler="cosine")

        def model():  # the same initial weights for both runs, whatever ran before this test
            torch.manual_seed(0)
            return create_model("compare_cnn", **cfg.model_overrides())

        full = fit(model(), *splits, cfg, device=dev)

        class StopAfter2(Callback):
            def on_checkpoint(self, path, epoch):
                if epoch == 2:
                    raise KeyboardInterrupt

        ckpt = tmp_path / "k.pt"
        with pytest.raises(KeyboardInterrupt):
            fit(model(), *splits, cfg, device=dev, callbacks=[StopAfter2()], checkpoint_path=ckpt)
        state = load_checkpoint(ckpt)
        assert state["epoch"] == 2
        resumed = fit(model(), *splits, cfg, device=dev, checkpoint_path=ckpt, resume=state)
    finally:
        torch.set_num_threads(threads)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    assert resumed.final == full.final


def test_early_stopping_restores_best(splits):
    cfg = _cfg(epochs=30, patience=2, lr=1e-6)
    model = create_model(cfg.model_name, **cfg.model_overrides())
    result = fit(model, *splits, cfg, device=pick_device("cpu"))
    assert result.stopped_early and len(result.history) < 30
    assert result.final["val_acc"] == pytest.approx(result.best_val_acc)


@pytest.mark.parametrize("scheduler", ["plateau", "onecycle", "none"])
def test_schedulers_and_bce(splits, scheduler):
    cfg = _cfg(epochs=2, scheduler=scheduler, loss="bce")
    result = fit(create_model(cfg.model_name, **cfg.model_overrides()), *splits, cfg, device=pick_device("cpu"))
    assert len(result.history) == 2


def _expected_lrs(cfg, history, steps: int) -> list[float]:
    """The learning rate each epoch ends with, from each schedule's closed form (the loop logs
    it after the epoch's steps, before the epoch's scheduler step)."""
    lr, n = cfg.lr, len(history)
    if cfg.scheduler == "none":
        return [lr] * n
    if cfg.scheduler == "cosine":  # eta_min + (lr - eta_min)(1 + cos(pi t / T)) / 2 at t = epochs done
        low = cfg.sched.cosine_min_lr
        return [low + (lr - low) * (1 + math.cos(math.pi * (e - 1) / cfg.epochs)) / 2 for e in range(1, n + 1)]
    if cfg.scheduler == "onecycle":  # cosine up from lr/25 to lr, then down to lr/25/1e4, by step
        start, peak = lr / 25, lr
        end, total = start / 1e4, cfg.epochs * steps
        up = cfg.sched.onecycle_pct_start * total - 1

        def at(k: int) -> float:
            a, b, pct = (start, peak, k / up) if k <= up else (peak, end, (k - up) / (total - 1 - up))
            return b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)
        return [at(e * steps) for e in range(1, n + 1)]
    # plateau: x factor once val accuracy has not beaten its best (relative 1e-4) for more than `patience` epochs
    out, best, bad = [], -math.inf, 0
    for row in history:
        out.append(lr)
        if row["val_acc"] > best * (1 + 1e-4):
            best, bad = row["val_acc"], 0
        else:
            bad += 1
        if bad > cfg.sched.plateau_patience:
            lr, bad = lr * cfg.sched.plateau_factor, 0
    return out


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau", "none"])
def test_learning_rates_follow_the_schedule(splits, scheduler):
    cfg = _cfg(epochs=6, scheduler=scheduler, lr=2e-3).updated({"sched.plateau_patience": 1,
                                                               "sched.cosine_min_lr": 1e-4})
    result = fit(create_model(cfg.model_name, **cfg.model_overrides()), *splits, cfg, device=pick_device("cpu"))
    logged = [row["lr"] for row in result.history]
    assert logged == pytest.approx(_expected_lrs(cfg, result.history, steps=3), rel=1e-9, abs=1e-15)
    if scheduler == "plateau":
        assert len(set(logged)) > 1  # the schedule did act, so the comparison saw a drop


def test_bf16_autocast_on_cpu_trains(splits):
    cfg = _cfg(epochs=1, amp="bf16")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model_name, **cfg.model_overrides())
    result = fit(model, *splits, cfg, device=pick_device("cpu"))
    assert np.isfinite(result.history[0]["train_loss"])
    # Autocast, not a cast: the weights stay fp32 while the forward pass runs in bf16...
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    fp32 = _cfg(epochs=1, amp="off")
    torch.manual_seed(fp32.seed)  # the same initial weights
    ref = fit(create_model(fp32.model_name, **fp32.model_overrides()), *splits, fp32, device=pick_device("cpu"))
    # ...so the same seed trains to close but not identical figures (bf16 keeps 8 bits of mantissa).
    a, b = result.history[0]["train_loss"], ref.history[0]["train_loss"]
    assert a != b and a == pytest.approx(b, rel=0.05)


def test_predict_proba_batched_matches_unbatched(splits):
    model = create_model("compare_cnn", width_mult=0.25, feat_dim=16)
    dev = pick_device("cpu")
    a = predict_proba(model, splits[1].x[:50], device=dev, batch_size=7)
    b = predict_proba(model, splits[1].x[:50], device=dev, batch_size=50)
    assert a.shape == (50,) and np.allclose(a, b, atol=1e-5) and ((a >= 0) & (a <= 1)).all()


def test_focal_loss_downweights_easy_examples():
    y = torch.tensor([1.0, 1.0])
    easy, hard = torch.tensor([4.0, 4.0]), torch.tensor([-1.0, -1.0])
    ratio_focal = focal_loss(easy, y) / focal_loss(hard, y)
    ratio_bce = torch.nn.functional.binary_cross_entropy_with_logits(easy, y) / \
        torch.nn.functional.binary_cross_entropy_with_logits(hard, y)
    assert ratio_focal < ratio_bce


def test_augment_swap_flips_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 28, 56)
    x[:, :, :28] = 1.0  # bright left, dark right
    y = torch.ones(64)
    xa, ya, _ = augment_batch(x, y, g)
    swapped = ya == 0
    assert 10 < swapped.sum() < 54
    left_brighter = xa[:, :, :28].sum(dim=(1, 2)) > xa[:, :, 28:].sum(dim=(1, 2))
    assert torch.equal(left_brighter, ~swapped)


@pytest.mark.parametrize("over, text", [({"scheduler": "linear"}, "scheduler"), ({"lr": 0}, "lr"),
                                        ({"layers": "3,x"}, "layers"), ({"amp": "int8"}, "amp")])
def test_bad_config_values(over, text):
    with pytest.raises(PairnetError, match=text):
        _cfg(**over).validate()


def test_eta_reads_like_a_person_would_say_it():
    from pairnet.train.loop import eta

    assert [eta(s) for s in (0, 30, 600, 7200)] == ["done", "ETA 30 s", "ETA 10 min", "ETA 2.0 h"]


@pytest.mark.parametrize("flags, expected", [("fpu sse2 avx512f avx512_bf16", torch.bfloat16),  # Cooper Lake, Zen 4
                                             ("fpu avx512f amx_bf16 amx_tile", torch.bfloat16),  # Sapphire Rapids
                                             ("fpu sse2 avx2 avx512f", None), ("", None)])
def test_amp_auto_on_cpu_picks_bf16_where_the_chip_computes_it(monkeypatch, flags, expected):
    from pairnet import device

    cpuinfo = f"processor\t: 0\nmodel name\t: test chip\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    parse = device.cpu_flags
    monkeypatch.setattr(device, "cpu_flags", lambda: parse(cpuinfo))
    assert device.amp_dtype("auto", torch.device("cpu")) is expected
    assert device.amp_dtype("off", torch.device("cpu")) is None


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_cuda_takes_fp16_where_bf16_is_only_emulated(monkeypatch, native, expected):
    from pairnet.train import loop

    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a pre-Ampere GPU: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert loop.amp_dtype("auto", torch.device("cuda")) is expected and asked == [False]


def test_cuda_speedups_turn_on_autotuning_and_tf32():
    from pairnet.train import loop

    # Process-wide flags: restored afterwards. torch >= 2.9 names TF32 fp32_precision.
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    if hasattr(cuda.matmul, "fp32_precision"):
        flags = [(cuda.matmul, "fp32_precision", "tf32"), (cudnn.conv, "fp32_precision", "tf32")]
    else:
        flags = [(cuda.matmul, "allow_tf32", True), (cudnn, "allow_tf32", True)]
    flags.append((cudnn, "benchmark", True))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
    try:
        loop.enable_cuda_speedups()
        assert [getattr(obj, name) for obj, name, _ in flags] == [want for _, _, want in flags]
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def test_resume_from_another_device_keeps_the_generator_and_says_so(caplog):
    from pairnet.train import loop

    gen = torch.Generator().manual_seed(1)
    before = gen.get_state()
    state = {"torch": torch.get_rng_state(), "gen": torch.zeros(16, dtype=torch.uint8), "gen_device": "cuda"}
    with caplog.at_level("WARNING", logger="pairnet.train.loop"):
        loop._set_rng_state(state, gen)
    assert torch.equal(gen.get_state(), before) and "ran on cuda" in caplog.text


def test_compiled_model_checkpoints_plain_keys_and_resumes(splits, tmp_path):
    cfg = _cfg(epochs=2, compile=True)
    dev = pick_device("cpu")

    class StopAfter1(Callback):
        def on_checkpoint(self, path, epoch):
            raise KeyboardInterrupt

    ckpt = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(create_model(cfg.model_name, **cfg.model_overrides()), *splits, cfg, device=dev, callbacks=[StopAfter1()],
            checkpoint_path=ckpt)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and state["config"]["compile"] is True
    resumed = fit(create_model(cfg.model_name, **cfg.model_overrides()), *splits, cfg, device=dev,
                  checkpoint_path=ckpt, resume=state)
    assert [h["epoch"] for h in resumed.history] == [1, 2] and np.isfinite(resumed.history[-1]["train_loss"])
    saved = load_checkpoint(ckpt)
    plain = create_model(cfg.model_name, **cfg.model_overrides())
    assert not [k for k in [*saved["model"], *saved["best_state"]] if "_orig_mod" in k]
    assert set(saved["model"]) == set(plain.state_dict())
    plain.load_state_dict(saved["model"])  # strict: a plain model takes the compiled run's weights


def test_compile_without_a_cxx_compiler_falls_back_to_aot_eager(splits, monkeypatch, caplog):
    from pairnet.train import loop

    monkeypatch.setenv("CXX", "no-such-compiler-here")  # a slim image: inductor could not build its kernels
    with caplog.at_level("WARNING", logger="pairnet.train.loop"):
        assert loop.compile_backend() == "aot_eager"
        cfg = _cfg(epochs=1, compile=True)
        result = fit(create_model(cfg.model_name, **cfg.model_overrides()), *splits, cfg, device=pick_device("cpu"))
    assert np.isfinite(result.history[0]["train_loss"]) and "no-such-compiler-here: missing" in caplog.text
