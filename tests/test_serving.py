"""The served predictors run as the benchmarks do: one upload per batch for a whole stack,
bounded batches, and the probabilities of a plain fp32 forward (within bf16's tolerance
where the device autocasts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pairnet.models import create_model
from pairnet.serving import PairPredictor, StackPredictor, predictors
from pairnet.stacking import meta_features

# bf16 keeps 8 bits of mantissa: on these tiny untrained models probabilities move by < 1e-2.
BF16_ATOL = 2e-2


class MeanBooster:
    """Stands in for the LightGBM booster: the mean of the base models' probabilities."""

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return feats[:, ::2].mean(axis=1)  # meta-features alternate probability, logit


def tiny_models(n: int) -> list:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(create_model("compare_cnn", width_mult=0.25, feat_dim=16).eval())
    return models


def fp32_probabilities(model, x: np.ndarray) -> np.ndarray:
    """The plain forward serving used to run: fp32, contiguous, the whole input at once."""
    with torch.inference_mode():
        return torch.sigmoid(model(torch.from_numpy(x).float() / 255)).numpy()


@pytest.fixture
def uploads(monkeypatch):
    """The row count of every batch converted and copied to the device."""
    seen = []
    real = predictors.upload

    def counting(xb, device):
        seen.append(len(xb))
        return real(xb, device)

    monkeypatch.setattr(predictors, "upload", counting)
    return seen


def pairs(n: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 28, 56)).astype(dtype)


def test_stack_uploads_each_batch_once_for_all_members(uploads):
    models = tiny_models(3)
    x = pairs(10)
    expected = MeanBooster().predict(meta_features([fp32_probabilities(m, x) for m in models]))
    stack = StackPredictor([PairPredictor(m, device="cpu", amp="off") for m in models], MeanBooster(), batch=4)
    got = stack.predict(x)
    assert uploads == [4, 4, 2]  # one per batch, not one per batch and member
    assert list(got.columns) == ["label", "probability"]
    np.testing.assert_allclose(got["probability"], expected, atol=1e-6)


def test_predictions_equal_a_plain_fp32_forward():
    (model,) = tiny_models(1)
    x = pairs(37)
    want = fp32_probabilities(model, x)
    exact = PairPredictor(model, batch=16, device="cpu", amp="off")
    assert exact.amp is None and next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    got = exact.predict(x)
    assert got.dtype == np.float32 and got.shape == (37,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The default: the device's autocast dtype (bf16 on CPUs with AMX bf16 units, else fp32).
    auto = PairPredictor(model, batch=16, device="cpu")
    np.testing.assert_allclose(auto.predict(x), want, atol=BF16_ATOL if auto.amp is not None else 1e-6)
    forced = PairPredictor(model, batch=16, device="cpu", amp="bf16")
    assert forced.amp == torch.bfloat16
    np.testing.assert_allclose(forced.predict(x), want, atol=BF16_ATOL)


class PixelMean(torch.nn.Module):
    """A model as cheap as a model can be, so a big input costs only the batching."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1) - 0.5


def test_big_input_runs_in_bounded_batches(uploads):
    n = 2 * predictors.BATCH + 300
    x = pairs(n, dtype=np.int64)  # what JSON gives: cast per batch, never copied whole
    got = PairPredictor(PixelMean(), device="cpu").predict(x)
    assert uploads == [predictors.BATCH, predictors.BATCH, 300]
    want = torch.sigmoid(torch.from_numpy(x.reshape(n, -1).mean(1) / 255 - 0.5)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_stack_pyfunc_saved_and_loaded_serves_the_stack(tmp_path, uploads):
    import lightgbm
    import mlflow

    from pairnet.serving import save_stack_dir
    from pairnet.tracking.model import PYFUNC_CODE, STACK_SIGNATURE, requirements, stack_artifacts

    models = tiny_models(2)
    p = np.random.default_rng(0).uniform(0.01, 0.99, (200, 2))
    booster = lightgbm.train({"objective": "binary", "num_leaves": 3, "verbose": -1},
                             lightgbm.Dataset(meta_features(list(p.T)), label=(p.mean(1) > 0.5).astype(int)),
                             num_boost_round=5)
    folder = save_stack_dir({"a": models[0], "b": models[1]}, booster, tmp_path / "stack")
    x = pairs(9)
    mlflow.pyfunc.save_model(path=str(tmp_path / "model"), python_model=str(PYFUNC_CODE),
                             artifacts=stack_artifacts(folder), signature=STACK_SIGNATURE, input_example=x[:2],
                             pip_requirements=requirements("lightgbm", "pandas"))
    served = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    uploads.clear()
    out = served.predict(x)
    assert uploads == [9] and list(out.columns) == ["label", "probability"]
    want = StackPredictor.load(folder, device="cpu").predict(x)
    np.testing.assert_allclose(out["probability"], want["probability"], atol=1e-12)
