"""Passwords in URLs never reach params, tags or messages."""

from __future__ import annotations

import pytest

from pairnet.redact import mask_url


@pytest.mark.parametrize("text, masked", [
    ("postgresql://bob:s3cret@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),
    ("postgresql+psycopg2://bob:p@ss@db/optuna", "postgresql+psycopg2://bob:***@db/optuna"),
    ("redis://:token@cache:6379/0", "redis://:***@cache:6379/0"),
    ("storage 'mysql://a:x@h1/s' and 'mysql://b:y@h2/s' failed",
     "storage 'mysql://a:***@h1/s' and 'mysql://b:***@h2/s' failed"),
    ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
    ("postgresql://bob@db/optuna", "postgresql://bob@db/optuna"),
    ("http://host:5000/path?to=a@b", "http://host:5000/path?to=a@b"),
    ("no url here", "no url here"),
])
def test_mask_url(text, masked):
    assert mask_url(text) == masked
