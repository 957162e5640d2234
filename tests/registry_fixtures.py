"""The fixtures of the registry tests, which load this module as a pytest plugin
(`pytest_plugins = ["registry_fixtures"]`): an adapter to publish and a registry in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_helpers import write_adapter

from cotune.adapters.sqlite_registry import SqliteRegistry


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def registry(data_dir):
    reg = SqliteRegistry(data_dir)
    reg.create_tenant("acme")
    reg.create_tenant("globex")
    yield reg
    reg.close()
