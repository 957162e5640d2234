"""Adapter references on the wire: "name", "name@vK" or "name@K"."""

from __future__ import annotations

import re

from cotune.adapters.registry import NAME
from cotune.server.errors import invalid

_REFERENCE = re.compile(r"^(?P<name>[^@]*)(@v?(?P<version>\d{1,9}))?$")


def parse_reference(text: str, *, allow_version: bool = True) -> tuple[str, int | None]:
    """(name, version or None for the newest)."""
    match = _REFERENCE.match(text)
    if match is None or not NAME.match(match["name"]):
        raise invalid(f"adapter {text!r} is not a valid reference; accepted: 'name', "
                      "'name@vK' or 'name@K', the name 1-128 letters, digits, '.', '_' or '-' "
                      "starting with a letter or digit")
    version = None if match["version"] is None else int(match["version"])
    if version is not None and not allow_version:
        raise invalid(f"{text!r} names a version; this call takes an adapter name only")
    if version == 0:
        raise invalid(f"{text!r}: versions count from 1")
    return match["name"], version


def reference(name: str, version: int) -> str:
    return f"{name}@v{version}"


def runtime_key(tenant: str, name: str, version: int) -> str:
    """The key a tenant's adapter version is held under in the runtime's host and device
    tiers: Generate serves it, and a job that publishes it caches it there."""
    return f"{tenant}/{reference(name, version)}"
