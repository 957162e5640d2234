"""The registry's schema brought to the newest revision at every open, by Alembic over the
migrations in migrations/ (one history for SQLite and PostgreSQL). Many workers may open one
registry at once: the migrations run under the backend's write lock (migrations/env.py)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from cotune.adapters.registry import RegistryError


def migrate(engine: sa.Engine, where: str) -> None:
    """Upgrades the registry on `engine` (named `where` in errors) to the newest revision.
    Raises RegistryError when the registry was written by a newer cotune."""
    config = _config()
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        except CommandError as error:
            raise RegistryError(
                f"the registry {where} has a schema this cotune does not know ({error}); its "
                f"newest is revision {newest_revision()}; accepted: a registry written by this "
                "or an older cotune (upgrade cotune to open this one)") from None


def newest_revision() -> str:
    """The revision that `migrate` brings a registry to."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def _config() -> Config:
    config = Config()  # no alembic.ini: the script location is all it needs
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return config
