"""Logging and loading pairnet models, pickle-free.

Logged format: an MLflow *models-from-code* pyfunc (``pairnet/serving/pyfunc.py``) whose
artifacts are safetensors weights, a JSON spec and, for the stack, a LightGBM text
model — so ``mlflow.pyfunc.load_model(uri)`` works with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. Every registered version is tagged
``pairnet.format``.

Loading inside pairnet (``predict``, stacking, the pipeline) never runs code stored with
a model: :func:`load_trusted` checks the version's ``pairnet.format`` tag, downloads the
artifacts and rebuilds the network with pairnet's own code from the spec and tensors.
A version that pairnet did not log (say, a pickled model registered under a pairnet name)
is refused in one line.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from pairnet import names
from pairnet.data.pairs import IMAGE_SHAPE, to_labels
from pairnet.errors import PairnetError
from pairnet.models.pair import PairModel
from pairnet.paths import PACKAGE_DIR
from pairnet.serving import PairPredictor, StackPredictor, save_pair_dir
from pairnet.serving.predictors import LINEAGE, META_MODEL, SPEC, WEIGHTS

FORMAT = "safetensors-v1"
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "pyfunc.py"

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *IMAGE_SHAPE))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]),
)
# The stack: the same input, a label and its probability per pair.
STACK_SIGNATURE = ModelSignature(
    inputs=SIGNATURE.inputs,
    outputs=Schema([ColSpec("long", "label"), ColSpec("double", "probability")]),
)


# The public packages a served model imports (the pyfunc, the predictors and what they
# import), pinned as MLflow pins them: the versions installed where the model was logged.
SERVED_PACKAGES = ("torch", "numpy", "pandas", "safetensors", "scikit-learn", "scipy", "filelock")


def requirements(*extra: str) -> list[str]:
    """``name==version`` of every package the served model needs; pairnet itself travels with the
    model (``code_paths``), so an environment built from these needs no pairnet install."""
    return [f"{name}=={version(name).split('+')[0]}" for name in (*SERVED_PACKAGES, *extra)]


@contextlib.contextmanager
def package_code() -> Iterator[list[str]]:
    """``code_paths`` for ``log_model``: a clean copy of the pairnet package (sources only), which
    MLflow stores in the model's ``code/`` folder and puts on ``sys.path`` when it loads it."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / PACKAGE_DIR.name
        shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield [str(copy)]


def log_pair_model(model: PairModel, example: np.ndarray, registered_name: str | None = None):
    """Log (and register, tagged ``pairnet.format``) the model; returns MLflow's ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp, package_code() as code:
        folder = save_pair_dir(model, Path(tmp) / "pair")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(folder / WEIGHTS), "spec": str(folder / SPEC)},
            signature=SIGNATURE, input_example=np.ascontiguousarray(example[:2]),
            registered_model_name=registered_name, pip_requirements=requirements(), code_paths=code,
        )
    mark_version(registered_name, info, "pair")
    return info


def stack_artifacts(folder: Path) -> dict[str, str]:
    """The pyfunc artifacts of a stack folder (``lineage.json``, the booster, ``bases/``); the
    pyfunc finds the folder through ``lineage``."""
    return {"lineage": str(folder / LINEAGE), "meta_model": str(folder / META_MODEL), "bases": str(folder / "bases")}


def mark_version(name: str | None, info, kind: str) -> None:
    if name is not None and info.registered_model_version is not None:
        client = MlflowClient()
        client.set_model_version_tag(name, str(info.registered_model_version), names.TAG_FORMAT, FORMAT)
        client.set_model_version_tag(name, str(info.registered_model_version), names.TAG_KIND, kind)


def _download(uri: str, dst: Path) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise PairnetError(f"cannot download model '{uri}': {first}") from None


def check_version(uri: str, client: MlflowClient | None = None):
    """The registry version ``uri`` names, refused unless pairnet logged it."""
    from pairnet.tracking.registry import resolve_version

    mv = resolve_version(uri, client)
    fmt = (mv.tags or {}).get(names.TAG_FORMAT)
    if fmt != FORMAT:
        what = f"its {names.TAG_FORMAT} tag is '{fmt}'" if fmt else f"it has no {names.TAG_FORMAT} tag"
        raise PairnetError(f"{mv.name} version {mv.version} ({uri}) was not logged by pairnet ({what}); "
                           "refusing to load it: pairnet loads only its own pickle-free models")
    return mv


def load_trusted(uri: str, client: MlflowClient | None = None) -> PairPredictor | StackPredictor:
    """A pair model or the stack from ``models:/…`` (tag-checked), ``runs:/…`` or a local folder."""
    with tempfile.TemporaryDirectory() as tmp:
        if uri.startswith("models:/"):
            mv = check_version(uri, client)
            local = _download(f"models:/{mv.name}/{mv.version}", Path(tmp))
        elif "://" in uri or uri.startswith("runs:/"):
            local = _download(uri, Path(tmp))
        else:
            local = Path(uri)
            if not local.exists():
                raise PairnetError(f"model '{uri}' is neither a models:/ or runs:/ URI nor an existing folder")
        return load_folder(local, uri)


def load_folder(local: Path, uri: str) -> PairPredictor | StackPredictor:
    """Load from a downloaded MLflow model folder (or its ``artifacts`` folder)."""
    art = local / "artifacts" if (local / "artifacts").is_dir() else local
    if (art / LINEAGE).exists():
        return StackPredictor.load(art)
    if (art / WEIGHTS).exists():
        return PairPredictor.load(art)
    raise PairnetError(f"'{uri}' is not a pairnet model (no {WEIGHTS} or {LINEAGE} among its artifacts); "
                       "refusing to load it")


def copy_model_artifacts(uri: str, dst: Path, client: MlflowClient | None = None) -> Path:
    """The pickle-free files of a pairnet pair model version, copied into ``dst``."""
    mv = check_version(uri, client)
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(f"models:/{mv.name}/{mv.version}", Path(tmp))
        art = local / "artifacts"
        dst.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, SPEC):
            shutil.copy2(art / name, dst / name)
    return dst


def accuracy_on(uri: str, pairs, client: MlflowClient | None = None) -> float:
    """Accuracy of a registered pairnet model (a pair model or the stack) on labelled pairs:
    how the champion gate measures a champion on another version's val data."""
    return accuracies_on(uri, pairs, client=client)[0]


def gate_figure(name: str, version: str, gate):
    """A registered version's figure on the gate pairs ``gate``, scored exactly as the gate scores a
    champion from other data (``accuracy_on`` of the registry's copy), with that same scorer."""
    from pairnet.tracking.registry import GateFigure

    def evaluate(uri: str) -> float:
        return accuracy_on(uri, gate)

    return GateFigure.on(evaluate(f"models:/{name}/{version}"), gate, evaluate)


def accuracies_on(uri: str, *pair_sets, client: MlflowClient | None = None, tta: bool = False) -> list[float]:
    """Its accuracy on each labelled pair set, the model downloaded and loaded once; ``tta``: of
    the mean probability over the test-time shifts (``pairnet.tta``)."""
    from pairnet.tta import mean_over_shifts

    model = load_trusted(uri, client)
    predict = model.probabilities if isinstance(model, StackPredictor) else model.predict
    out = []
    for pairs in pair_sets:
        prob = mean_over_shifts(predict, pairs.x) if tta else predict(pairs.x)
        out.append(float((to_labels(prob) == np.asarray(pairs.y)).mean()))
    return out
