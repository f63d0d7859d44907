"""The model zoo, parametrised over the registry (timm-style)."""

from __future__ import annotations

import pytest
import torch

from pairnet.errors import PairnetError
from pairnet.models import create_model, list_models, model_from_spec
from pairnet.models.heads import FusionHeads

SMALL = dict(width_mult=0.25, feat_dim=16)


@pytest.mark.parametrize("name", list_models())
def test_shape_no_nan_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = create_model(name, **SMALL)
    x = torch.rand(6, 28, 56)
    out = model(x)
    assert out.shape == (6,)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(p.grad.abs().sum() > 0 for p in model.parameters()), "a parameter got an all-zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_rebuild_from_spec(name):
    model = create_model(name, **SMALL)
    clone = model_from_spec(model.spec)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(3, 28, 56)
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))


def test_variants_have_recipe_depths():
    assert create_model("resnet_optimized_1.12").spec["layers"] == [3, 3, 3]
    assert create_model("resnet_optimized").spec["layers"] == [2, 2, 2]
    fusion = create_model("resnet_fusion")
    assert fusion.spec["layers"] == [2, 2, 2] and isinstance(fusion.head, FusionHeads)


def test_towers_run_both_halves_in_one_call():
    model = create_model("compare_cnn", **SMALL)
    calls = []
    model.tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(torch.rand(5, 28, 56))
    assert calls == [10]


def test_unknown_model_lists_choices():
    with pytest.raises(PairnetError, match="unknown model 'resnet9000'.*compare_cnn"):
        create_model("resnet9000")


def test_unknown_override_lists_options():
    with pytest.raises(PairnetError, match="no option 'depth'.*layers"):
        create_model("resnet_optimized", depth=3)


@pytest.mark.parametrize("over, text", [({"block": "huge"}, "block 'huge'"), ({"attention": "x"}, "attention 'x'"),
                                        ({"layers": (0, 1)}, "positive")])
def test_bad_option_values(over, text):
    with pytest.raises(PairnetError, match=text):
        create_model("resnet", **over)


def test_each_fusion_head_depends_on_its_own_feature_only():
    torch.manual_seed(0)
    heads = FusionHeads(8, hidden=16, dropout=0.0).eval()
    fa, fb = torch.randn(4, 8), torch.randn(4, 8)
    feats = heads.features(fa, fb)
    base = heads.head_logits(feats)
    for i, name in enumerate(FusionHeads.NAMES):
        changed = dict(feats)
        changed[name] = feats[name] + 1.0
        diff = (heads.head_logits(changed) - base).abs().sum(dim=0)
        assert diff[i] > 0, f"head {name} ignores its feature"
        others = torch.cat([diff[:i], diff[i + 1:]])
        assert torch.all(others == 0), f"feature {name} leaks into another head"


def test_fusion_mix_weights_are_a_softmax_and_used():
    heads = FusionHeads(8, hidden=16, dropout=0.0).eval()
    assert torch.isclose(heads.weights().sum(), torch.tensor(1.0))
    fa, fb = torch.randn(4, 8), torch.randn(4, 8)
    before = heads(fa, fb)
    with torch.no_grad():
        heads.mix[0] += 5.0
    assert not torch.allclose(before, heads(fa, fb))


def test_bottleneck_and_cbam_options():
    model = create_model("resnet", block="bottleneck", attention="cbam", layers=(1, 1), width_mult=0.25, feat_dim=8)
    assert model(torch.rand(2, 28, 56)).shape == (2,)


@pytest.mark.parametrize("name", list_models())
def test_one_step_fit_then_saved_model_serves_its_signature(name, splits, tmp_path):
    """Every zoo entry trains one step with the real loop, and its pickle-free saved form
    serves the logged signature: uint8 (N, 28, 56) in, float32 probabilities (N,) out."""
    import numpy as np

    from conftest import small_config
    from pairnet.serving import PairPredictor, save_pair_dir
    from pairnet.tracking.model import SIGNATURE
    from pairnet.train import fit, pick_device

    train, val = splits
    cfg = small_config(model_name=name, epochs=1, max_steps_per_epoch=1)
    model = create_model(name, **cfg.model_overrides())
    result = fit(model, train, val, cfg, device=pick_device("cpu"))
    assert [h["epoch"] for h in result.history] == [1] and np.isfinite(result.history[0]["train_loss"])
    served = PairPredictor.load(save_pair_dir(model, tmp_path / name))
    (spec_in,) = SIGNATURE.inputs.inputs
    assert spec_in.type == np.dtype(np.uint8) and tuple(spec_in.shape) == (-1, 28, 56)
    prob = served.predict(val.x[:5])
    (spec_out,) = SIGNATURE.outputs.inputs
    assert prob.dtype == spec_out.type and prob.shape == (5,) and np.all((prob >= 0) & (prob <= 1))
    # The served model gives the trained model's probabilities (within bf16's rounding where
    # the device autocasts to it).
    model.eval()
    with torch.inference_mode():
        direct = torch.sigmoid(model(torch.from_numpy(val.x[:5]).float() / 255)).numpy()
    assert np.allclose(prob, direct, atol=1e-5 if served.amp is None else 2e-2)
