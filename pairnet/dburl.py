"""Database URLs for MLflow's backend store and Optuna's storage: ``postgresql://`` names a driver.

SQLAlchemy reads a bare ``postgresql://`` as psycopg2; psycopg 3 (what ``pip install
'pairnet[postgres]'`` brings, as a binary wheel) is ``postgresql+psycopg://``. Both MLflow
(3.x) and Optuna take either form. So that the URL a user writes works with whichever of the
two is installed, a bare ``postgresql://`` is given the installed driver here; a URL that
names its driver is left as it is.
"""

from __future__ import annotations

import importlib.util

from pairnet.errors import PairnetError
from pairnet.redact import mask_url

POSTGRES_EXTRA = "pip install 'pairnet[postgres]'"
CONNECT_TIMEOUT_S = 10  # a PostgreSQL host that drops packets would otherwise hold a connect for minutes


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def with_driver(url: str) -> str:
    """``url`` with ``postgresql://`` made explicit for the installed driver (psycopg2 first, as SQLAlchemy does)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "postgresql":
        return url
    if _installed("psycopg2"):
        return url
    if _installed("psycopg"):
        return f"postgresql+psycopg://{rest}"
    raise PairnetError(f"'{mask_url(url)}' needs a PostgreSQL driver and none is installed: {POSTGRES_EXTRA}")


def check_connects(url: str, what: str) -> None:
    """Connect once with SQLAlchemy, so a bad URL, driver, host or password fails in one line, password masked."""
    import sqlalchemy

    engine_url = with_driver(url)
    postgres = engine_url.startswith("postgresql") and "connect_timeout=" not in engine_url
    try:
        engine = sqlalchemy.create_engine(engine_url,
                                          connect_args={"connect_timeout": CONNECT_TIMEOUT_S} if postgres else {})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:  # SQLAlchemy raises many types for bad URLs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PairnetError(mask_url(f"{what} '{url}' is not usable: {first}")) from None
