"""The PostgreSQL server of the registry's tests (tests/postgres_server.py): a database of each
test's own, password authentication, and a server that stops and comes back."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest

pytest_plugins = ["postgres_server"]  # postgres_server and postgres_url

USER_TABLES = ("SELECT table_name FROM information_schema.tables "
               "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")


def connect(url: str, **options) -> psycopg.Connection:
    return psycopg.connect(url, connect_timeout=5, **options)


def test_each_database_is_new_and_empty(postgres_server):
    first, second = postgres_server.new_database(), postgres_server.new_database()
    assert urlsplit(first).path != urlsplit(second).path
    with connect(first) as conn:
        assert conn.execute(USER_TABLES).fetchall() == []
        conn.execute("CREATE TABLE adapters (name text PRIMARY KEY)")
    with connect(second) as conn:
        assert conn.execute(USER_TABLES).fetchall() == []


def test_url_names_the_server_and_its_superuser(postgres_server, postgres_url):
    url = urlsplit(postgres_url)
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "127.0.0.1",
                                                    postgres_server.port)
    assert (url.username, url.password) == (postgres_server.user, postgres_server.password)
    with connect(postgres_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("cotune",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)


def test_a_connection_without_the_password_is_refused(postgres_server, postgres_url,
                                                      tmp_path, monkeypatch):
    # libpq would take a password from these: the test's connections have none
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    without = postgres_url.replace(f":{postgres_server.password}@", "@")
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        connect(without)
    wrong = postgres_url.replace(postgres_server.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(wrong)


def test_stop_refuses_connections_and_start_brings_the_data_back(postgres_server,
                                                                 postgres_url):
    with connect(postgres_url) as conn:
        conn.execute("CREATE TABLE adapters (name text PRIMARY KEY)")
        conn.execute("INSERT INTO adapters VALUES ('support-bot')")
    kept = connect(postgres_url)
    try:
        postgres_server.stop()
        with pytest.raises(psycopg.OperationalError):
            connect(postgres_url)
        with pytest.raises(psycopg.OperationalError):  # an open connection is cut too
            kept.execute("SELECT 1")
    finally:
        kept.close()
        postgres_server.start()
    with connect(postgres_url) as conn:
        assert conn.execute("SELECT name FROM adapters").fetchall() == [("support-bot",)]
    assert postgres_server.new_database() != postgres_url
