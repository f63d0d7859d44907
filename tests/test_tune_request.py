"""TuneRequest.validate: every bad number is one line, before anything runs."""

from __future__ import annotations

import pytest

from pairnet.errors import PairnetError
from pairnet.tune import TuneRequest


@pytest.mark.parametrize("field, value, text", [
    ("lr_high", float("inf"), "lr bounds [0.0001, inf] must be finite"),
    ("wd_low", float("nan"), "weight_decay bounds [nan, 0.001] must be finite"),
    ("wd_low", -1e-5, "weight_decay bounds [-1e-05, 0.001]"),
    ("timeout", float("inf"), "timeout must be a finite number"),
    ("timeout", -1.0, "timeout must be a finite number"),
    ("n_trials", 0, "n_trials must be a whole number >= 1"),
    ("n_trials", float("nan"), "n_trials must be a whole number >= 1"),
    ("epochs", -1, "epochs must be a whole number >= 0"),
    ("heartbeat_interval", 0, "heartbeat_interval must be a whole number >= 1"),
    ("grace_period", 10, "grace_period must be a whole number >= 11"),
])
def test_tune_request_refuses_bad_numbers(field, value, text):
    with pytest.raises(PairnetError) as err:
        TuneRequest(**{field: value}).validate()
    assert text in str(err.value) and "\n" not in str(err.value)
