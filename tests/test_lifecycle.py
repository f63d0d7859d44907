"""Signals turn into exceptions that end runs; one swallowed by Python is delivered again."""

from __future__ import annotations

import os
import signal
import time
import weakref

import pytest

from pairnet.tracking.lifecycle import Terminated, sigterm_raises


def test_a_sigterm_swallowed_by_a_gc_callback_is_delivered_again(capsys):
    class Thing:
        pass

    def callback(ref):  # the handler runs in here: its exception is "ignored" by Python
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200_000):
            pass

    started = time.monotonic()
    with pytest.raises(Terminated), sigterm_raises():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        assert ref() is None
        while time.monotonic() - started < 10:  # ordinary code: the signal lands here again
            time.sleep(0.01)
    assert time.monotonic() - started < 5
    assert "Traceback" not in capsys.readouterr().err  # nothing printed as "Exception ignored"
