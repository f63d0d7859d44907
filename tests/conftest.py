"""Shared fixtures: a tiny default dataset made once per session."""

from __future__ import annotations

import pytest

from pairnet.data.generate import GenConfig, make_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The embedded default dataset at size tiny, as a user would make it."""
    out = tmp_path_factory.mktemp("tiny_data")
    make_dataset(out, GenConfig(size="tiny", seed=3))
    return out
