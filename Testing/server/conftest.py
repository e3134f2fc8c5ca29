"""Fixtures of the server tests: databases (SQLite file, PostgreSQL schema), tiny model packages and
real servers on loopback ports, shared per session because each start imports torch (seconds)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

POSTGRES_ENV = "DAFNE_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]


def postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (CI's .ci/run sets it; a PostgreSQL server is needed)")
    return url


@pytest.fixture(scope="session")
def postgres_schema_factory():
    """Make fresh PostgreSQL schemas (dropped at the end); returns URLs whose search_path is the schema."""
    import sqlalchemy as sa

    created: list[str] = []
    engine = None

    def make() -> str:
        nonlocal engine
        base = postgres_base_url()
        engine = engine or sa.create_engine(base)
        schema = f"dafne_test_{uuid.uuid4().hex[:10]}"
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        created.append(schema)
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}options=-csearch_path%3D{schema}"

    yield make
    if engine is not None:
        with engine.begin() as conn:
            for schema in created:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path, postgres_schema_factory) -> str:
    """A fresh empty database of each kind ('' = SQLite in the data dir)."""
    return "" if request.param == "sqlite" else postgres_schema_factory()


@pytest.fixture(scope="session")
def tiny_leg():
    from dafne_server.testing import tiny_package

    return tiny_package("leg")


SHARED_FAMILIES = ("leg", "inputs", "fuzz", "client", "uploads", "rollback")
SHARED_MERGE = {"buffer_size": 2, "dice_tolerance": 0.05, "label_tolerance": 0.5}


def _start_shared(tmp_path_factory, tiny_leg, database_url: str):
    from dafne_server.testing import LocalServer

    server = LocalServer(tmp_path_factory.mktemp("server"), database_url=database_url,
                         families={name: tiny_leg for name in SHARED_FAMILIES}, merge=SHARED_MERGE,
                         run_args=["--uploads-per-hour", "8", "--refused-uploads-per-hour", "30",
                                   "--max-upload-mb", "1", "--validation-cases", "1",
                                   "--validation-shape", "8", "64", "96"])
    return server.start()


@pytest.fixture(scope="session")
def sqlite_server(tmp_path_factory, tiny_leg) -> Iterator:
    server = _start_shared(tmp_path_factory, tiny_leg, "")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgresql_server(tmp_path_factory, tiny_leg, postgres_schema_factory) -> Iterator:
    server = _start_shared(tmp_path_factory, tiny_leg, postgres_schema_factory())
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def live_server(request):
    """The shared server on each database backend (PostgreSQL skipped without its URL)."""
    return request.getfixturevalue(f"{request.param}_server")
