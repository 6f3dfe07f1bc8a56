"""Fixtures shared by the GC test modules, as a pytest plugin: a module
that uses them says so with ``pytest_plugins = ("gc_fixtures",)``.

(Not in ``conftest.py``'s ``pytest_plugins``: ``test_devstack`` copies
``conftest.py`` into a child session that has no ``gc_fixtures`` module.)

A module that needs a different GC (another configuration) defines its own
fixture of the same name, which takes precedence over these.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from gc_harness import DevKeys, GcClients, RunningGc, gc_clients, gc_environ, running_gc

from darktower.shared.devstack import create_database, drop_database


@pytest.fixture
def keys(tmp_path: Path) -> DevKeys:
    """A fresh signing key pair and its JWKS file (the GC trusts it)."""
    return DevKeys.create(tmp_path / "keys")


@pytest.fixture
async def gc(db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str) -> AsyncIterator[RunningGc]:
    """A GC in-process with default configuration on the (emptied) session
    database."""
    async with running_gc(gc_environ(keys, database_dsn)) as running:
        yield running


@pytest.fixture
async def clients(gc: RunningGc) -> AsyncIterator[GcClients]:
    """gRPC stubs on one connection to :func:`gc`."""
    async with gc_clients(gc.endpoints.grpc_port) as c:
        yield c


@pytest.fixture
def empty_database(pg_server_dsn: str) -> Iterator[str]:
    """A brand-new database with no schema at all; its DSN. Dropped afterwards."""
    name = f"dt_test_empty_{secrets.token_hex(6)}"
    dsn = create_database(pg_server_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_server_dsn, name)
