"""pairnet: MLflow-tracked siamese CNNs for corrupted digit-pair comparison."""

from importlib.metadata import PackageNotFoundError, version

from pairnet.errors import PairnetError

__all__ = ["PairnetError", "__version__"]
try:  # pyproject.toml holds the one version; the installed metadata carries it
    __version__ = version("pairnet")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
