"""Where a study lives: the journal file by default, RDB URLs with the installed PostgreSQL driver,
and the journal's stand-in for a heartbeat (trials of processes that are gone are failed and re-queued)."""

from __future__ import annotations

import os
import socket

import optuna
import pytest

from pairnet import dburl
from pairnet.errors import PairnetError
from pairnet.paths import folder_key
from pairnet.proc import ProcessId
from pairnet.tune import PROCESS_ATTR, JournalStudyStorage, TuneRequest, open_storage


@pytest.mark.parametrize("installed, url, expected", [
    ({"psycopg2", "psycopg"}, "postgresql://u:pw@db:5432/optuna", "postgresql://u:pw@db:5432/optuna"),
    ({"psycopg"}, "postgresql://u:pw@db:5432/optuna", "postgresql+psycopg://u:pw@db:5432/optuna"),
    ({"psycopg"}, "postgresql+psycopg2://u@db/optuna", "postgresql+psycopg2://u@db/optuna"),
    (set(), "sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
])
def test_postgresql_url_names_the_installed_driver(monkeypatch, installed, url, expected):
    monkeypatch.setattr(dburl, "_installed", lambda module: module in installed)
    assert dburl.with_driver(url) == expected


def test_postgresql_without_a_driver_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dburl, "_installed", lambda module: False)
    with pytest.raises(PairnetError) as err:
        dburl.with_driver("postgresql://bob:s3cret@db/optuna")
    assert str(err.value) == ("'postgresql://bob:***@db/optuna' needs a PostgreSQL driver and none is installed: "
                              "pip install 'pairnet[postgres]'")


def test_default_storage_is_a_journal_unless_only_the_old_database_exists(tmp_path, monkeypatch):
    own, user = tmp_path / "data", tmp_path / "mine"
    monkeypatch.setenv("PAIRNET_DATA_DIR", str(own))
    monkeypatch.setenv("PAIRNET_STATE_DIR", str(tmp_path / "state"))
    assert TuneRequest(data_dir=str(own)).storage_url() == str(own / "optuna.journal")
    # A user's folder gets nothing of pairnet's: its journal lives in the state folder.
    journal = TuneRequest(data_dir=str(user)).storage_url()
    assert journal == str(tmp_path / "state" / "optuna" / f"{folder_key(user)}.journal")
    assert journal != TuneRequest(data_dir=str(tmp_path / "other")).storage_url() and not user.exists()
    user.mkdir()
    (user / "optuna.db").touch()  # studies from before the journal continue where they are
    assert TuneRequest(data_dir=str(user)).storage_url() == f"sqlite:///{user / 'optuna.db'}"
    (user / "optuna.journal").touch()
    assert TuneRequest(data_dir=str(user)).storage_url() == str(user / "optuna.journal")
    monkeypatch.chdir(tmp_path)
    assert TuneRequest(storage="mine.journal").storage_url() == str(tmp_path / "mine.journal")


def test_journal_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(PairnetError) as err:
        open_storage(TuneRequest(storage=str(tmp_path / "nowhere" / "optuna.journal")))
    assert f"the folder {tmp_path / 'nowhere'} does not exist" in str(err.value) and "\n" not in str(err.value)


def test_opening_a_journal_fails_and_requeues_the_trials_of_dead_processes(tmp_path):
    req = TuneRequest(storage=str(tmp_path / "optuna.journal"), study_name="j")
    study = optuna.create_study(study_name="j", storage=open_storage(req), direction="maximize")
    owners = {
        "dead": ProcessId(socket.gethostname(), os.getpid(), 1.0),  # this pid, another start time: gone
        "alive": ProcessId.current(),
        "elsewhere": ProcessId("another-host", 1, 1.0),  # undecidable here: left alone
    }
    numbers = {}
    for name, who in owners.items():
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.set_user_attr(PROCESS_ATTR, who.as_tags())
        numbers[name] = trial.number

    storage = open_storage(req)
    assert isinstance(storage, JournalStudyStorage)
    trials = optuna.load_study(study_name="j", storage=storage).trials
    states = {name: trials[n].state for name, n in numbers.items()}
    assert states == {"dead": optuna.trial.TrialState.FAIL, "alive": optuna.trial.TrialState.RUNNING,
                      "elsewhere": optuna.trial.TrialState.RUNNING}
    (retry,) = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == numbers["dead"] and retry.params == trials[numbers["dead"]].params
    open_storage(req)  # once only: the failed trial is not failed (nor re-queued) again
    assert len(optuna.load_study(study_name="j", storage=storage).trials) == len(trials)
