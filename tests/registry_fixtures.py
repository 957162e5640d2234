"""The fixtures of the registry tests, which load this module as a pytest plugin
(`pytest_plugins = ["registry_fixtures"]`): an adapter to publish, and a registry on each
backend: the embedded SQLite one in tmp_path, and PostgreSQL, a fresh database of a real server
(postgres_server) per test. A test of one backend's own behaviour overrides `backend` with
`@pytest.mark.parametrize("backend", ["sqlite"])`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_helpers import write_adapter

from cotune.adapters.sql_registry import SqlRegistry, open_registry

pytest_plugins = ["postgres_server"]

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def registry_url(backend, request) -> str:
    """The test's registry URL: "" for the embedded SQLite one in data_dir."""
    return request.getfixturevalue("postgres_url") if backend == "postgresql" else ""


@pytest.fixture
def open_here(registry_url, data_dir) -> Callable[..., SqlRegistry]:
    """Opens the test's registry (again, at every call): its database and its data_dir.
    Takes open_registry's default_quotas."""
    return functools.partial(open_registry, registry_url, data_dir)


@pytest.fixture
def registry(open_here):
    reg = open_here()
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    yield reg
    reg.close()
