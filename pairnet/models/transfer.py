"""Copy weights from a trained model into a new one where names and shapes match.

The whole tower must be covered: a fine-tuned model that silently kept half its tower
random would look like a transfer and behave like a fresh start. Heads are copied
when they match too (same head type), and start fresh otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pairnet.errors import PairnetError


@dataclass
class TransferReport:
    copied: int  # tensors copied
    fresh: int  # tensors of the new model left at their initial values
    tower_copied: int

    def as_params(self) -> dict:
        return {"init.copied_tensors": self.copied, "init.fresh_tensors": self.fresh,
                "init.tower_tensors": self.tower_copied}


def describe(spec: dict) -> str:
    """A short architecture description, e.g. ``resnet_optimized (resnet, layers 2,2,2, width 0.5)``."""
    bits = [spec.get("builder", "?")]
    if spec.get("layers") is not None:
        bits.append("layers " + ",".join(str(v) for v in spec["layers"]))
    if spec.get("width_mult") is not None:
        bits.append(f"width {spec['width_mult']}")
    if spec.get("feat_dim") is not None:
        bits.append(f"feat_dim {spec['feat_dim']}")
    return f"{spec.get('name', '?')} ({', '.join(bits)})"


def copy_matching(model: nn.Module, state: dict[str, torch.Tensor], *, source_spec: dict,
                  source: str) -> TransferReport:
    """Load every tensor of ``state`` whose name and shape match into ``model``.

    Raises PairnetError, naming both architectures, when any tower tensor has no match.
    """
    target = model.state_dict()
    matched = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    tower_keys = [k for k in target if k.startswith("tower.")]
    missing = [k for k in tower_keys if k not in matched]
    if missing:
        raise PairnetError(
            f"init_from {source}: its architecture {describe(source_spec)} does not match "
            f"{describe(getattr(model, 'spec', {}))}: {len(missing)} of {len(tower_keys)} tower tensors "
            f"differ (e.g. '{missing[0]}'); pretrain the same variant and width, or leave init_from empty")
    with torch.no_grad():
        for key, value in matched.items():
            target[key].copy_(value)
    return TransferReport(copied=len(matched), fresh=len(target) - len(matched), tower_copied=len(tower_keys))
