"""Pair files, the embedded default dataset, and batched on-device augmentation."""

from pairnet.data.pairs import PairSet, join_labels, load_pairs, read_labels_csv, save_pairs

__all__ = ["PairSet", "join_labels", "load_pairs", "read_labels_csv", "save_pairs"]
