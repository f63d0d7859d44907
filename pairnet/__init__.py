"""pairnet: MLflow-tracked siamese CNNs for corrupted digit-pair comparison."""

from pairnet.errors import PairnetError

__all__ = ["PairnetError", "__version__"]
__version__ = "0.1.0"
