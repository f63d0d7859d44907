"""Digit supervision and fine-tuning: the digit head, init_from's weight copy, freezing."""

from __future__ import annotations

import pytest
import torch

from pairnet.data.pairs import PairSet
from pairnet.errors import PairnetError
from pairnet.models import create_model
from pairnet.models.transfer import copy_matching
from pairnet.presets import build_config
from pairnet.train import TrainConfig, fit, load_checkpoint, pick_device

from conftest import small_config


def _cfg(**over) -> TrainConfig:
    return small_config(**{"model_name": "resnet_optimized", "epochs": 2, **over})


def _without_digits(p: PairSet) -> PairSet:
    return PairSet(x=p.x, y=p.y, ids=p.ids, source=p.source + " (no digits)")


def _model(cfg: TrainConfig, digit_head: bool):
    torch.manual_seed(0)
    return create_model(cfg.model_name, digit_head=digit_head, **cfg.model_overrides())


def test_digit_loss_trains_the_digit_head_and_logs_digit_accuracy(splits):
    train, val = splits
    assert {"digit_a", "digit_b"} <= set(train.extras)  # the default set carries them
    cfg = _cfg(aux_digit_weight=1.0)
    model = _model(cfg, digit_head=True)
    before = model.digit_head.weight.detach().clone()
    res = fit(model, train, val, cfg, device=pick_device("cpu"))
    assert not torch.equal(before, model.digit_head.weight)
    for row in res.history:
        assert 0 <= row["train_digit_acc"] <= 1 and 0 <= row["val_digit_acc"] <= 1


def test_digit_head_untouched_without_digit_loss(splits):
    train, val = splits
    cfg = _cfg()  # aux_digit_weight 0: pair loss only, even though the file has digit labels
    model = _model(cfg, digit_head=True)
    before = model.digit_head.weight.detach().clone()
    res = fit(model, train, val, cfg, device=pick_device("cpu"))
    assert torch.equal(before, model.digit_head.weight)
    assert "train_digit_acc" not in res.history[-1] and "val_digit_acc" not in res.history[-1]


def test_digit_loss_without_digit_labels_is_an_error(splits):
    train, val = splits
    cfg = _cfg(aux_digit_weight=0.5)
    with pytest.raises(PairnetError, match="aux_digit_weight 0.5 needs digit labels.*no digits"):
        fit(_model(cfg, digit_head=True), _without_digits(train), val, cfg, device=pick_device("cpu"))


def test_digit_head_does_not_change_pair_prediction():
    torch.manual_seed(1)
    plain = create_model("resnet_optimized", width_mult=0.25, feat_dim=16).eval()
    torch.manual_seed(1)
    with_head = create_model("resnet_optimized", width_mult=0.25, feat_dim=16, digit_head=True).eval()
    x = torch.rand(3, 28, 56)
    assert torch.equal(plain(x), with_head(x))
    logits, digits = with_head.forward_with_digits(x)
    assert torch.equal(logits, with_head(x)) and digits.shape == (6, 10)


def test_copy_matching_copies_tower_and_matching_head():
    torch.manual_seed(2)
    src = create_model("resnet_optimized", width_mult=0.25, feat_dim=16, digit_head=True)
    torch.manual_seed(3)
    dst = create_model("resnet_fusion", width_mult=0.25, feat_dim=16)  # same tower, fusion heads
    report = copy_matching(dst, src.state_dict(), source_spec=src.spec, source="models:/pairnet-pretrain-x/1")
    s, d = src.state_dict(), dst.state_dict()
    for k in d:
        if k.startswith("tower."):
            assert torch.equal(d[k], s[k]), k
    assert report.tower_copied == sum(k.startswith("tower.") for k in d) and report.fresh > 0
    # Same variant: the pair head is copied too.
    torch.manual_seed(4)
    twin = create_model("resnet_optimized", width_mult=0.25, feat_dim=16)
    copy_matching(twin, src.state_dict(), source_spec=src.spec, source="x")
    assert all(torch.equal(v, s[k]) for k, v in twin.state_dict().items())


@pytest.mark.parametrize("variant, over", [("resnet_optimized_1.12", {}), ("resnet_optimized", {"width_mult": 0.5}),
                                           ("improved_v2", {})])
def test_copy_matching_refuses_another_architecture(variant, over):
    src = create_model("resnet_optimized", width_mult=0.25, feat_dim=16)
    dst = create_model(variant, **{"width_mult": 0.25, "feat_dim": 16, **over})
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(PairnetError) as err:
        copy_matching(dst, src.state_dict(), source_spec=src.spec, source="models:/pairnet-pretrain-resnet_optimized/3")
    msg = str(err.value)
    assert "\n" not in msg and "models:/pairnet-pretrain-resnet_optimized/3" in msg
    assert "resnet_optimized (resnet" in msg and f"{variant} (" in msg
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing half-copied


def test_freeze_epochs_keep_the_tower_fixed_then_release_it(splits, tmp_path):
    train, val = splits
    cfg = _cfg(freeze_epochs=1, epochs=1)
    model = _model(cfg, digit_head=False)
    tower = {k: v.clone() for k, v in model.tower.state_dict().items()}
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    fit(model, train, val, cfg, device=pick_device("cpu"))
    assert all(torch.equal(v, tower[k]) for k, v in model.tower.state_dict().items())  # BN statistics too
    assert not all(torch.equal(v, head[k]) for k, v in model.head.state_dict().items())
    # Epoch 2 trains the tower: the last epoch's weights (checkpoint) differ from the start.
    cfg = _cfg(freeze_epochs=1, epochs=2)
    model = _model(cfg, digit_head=False)
    fit(model, train, val, cfg, device=pick_device("cpu"), checkpoint_path=tmp_path / "last.pt")
    last = load_checkpoint(tmp_path / "last.pt")["model"]
    assert not all(torch.equal(last[f"tower.{k}"], v) for k, v in tower.items())


def test_tower_lr_mult_scales_the_tower_group(splits):
    train, val = splits
    cfg = _cfg(tower_lr_mult=0.0, epochs=1, weight_decay=0.0)
    model = _model(cfg, digit_head=False)
    weights = {k: v.clone() for k, v in model.tower.named_parameters()}
    fit(model, train, val, cfg, device=pick_device("cpu"))
    assert all(torch.equal(v, weights[k]) for k, v in model.tower.named_parameters())


@pytest.mark.parametrize("over, text", [({"aux_digit_weight": float("nan")}, "aux_digit_weight"),
                                        ({"tower_lr_mult": -1.0}, "tower_lr_mult"),
                                        ({"freeze_epochs": -1}, "freeze_epochs"),
                                        ({"init_from": "runs:/abc/model"}, "init_from")])
def test_bad_fine_tuning_values(over, text):
    with pytest.raises(PairnetError, match=text):
        _cfg(**over).validate()


def test_presets_for_pretrain_and_fine_tuning():
    pre = build_config("pretrain", "quick", {})
    assert pre.aux_digit_weight > 0 and pre.model_name == "resnet_optimized"
    scratch = build_config("stage2", "quick", {})
    tuned = build_config("stage2", "quick", {"init_from": "models:/pairnet-pretrain-resnet_optimized/1"})
    assert scratch.init_from == "" and scratch.aux_digit_weight == 0 and scratch.tower_lr_mult == 1.0
    assert tuned.tower_lr_mult < 1 and tuned.epochs < scratch.epochs
    # The user's explicit value wins over the fine-tuning preset.
    assert build_config("stage2", "quick", {"init_from": "models:/a/1", "epochs": 9}).epochs == 9
