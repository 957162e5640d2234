"""Uploaded files in the registry: a file's row in the database, its bytes in the
FileStore (in which order the two are written: file_store.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import BinaryIO

from cotune.adapters.file_store import is_file_id, new_file_id
from cotune.adapters.registry import FileRecord, NotFound, QuotaExceeded, files_refusal
from cotune.adapters.sql_database import Connection, Row, SqlDatabase, checked_limit
from cotune.adapters.sql_tenants import load_tenant


class SqlFiles(SqlDatabase):
    """The file calls of the Registry."""

    def add_file(self, tenant: str, filename: str, purpose: str, staged: Path,
                 max_files: int = 0) -> FileRecord:
        file_id, now = new_file_id(), time.time()
        size = Path(staged).stat().st_size
        self._files.put(file_id, staged)
        try:
            with self._transaction(write=True) as db:
                load_tenant(db, tenant)
                count = db.execute("SELECT COUNT(*) FROM files WHERE tenant = ?",
                                   (tenant,)).fetchone()[0]
                if 0 < max_files <= count:
                    raise QuotaExceeded("max_files", files_refusal(tenant, count))
                db.execute("INSERT INTO files (id, tenant, filename, purpose, size_bytes, "
                           "created) VALUES (?, ?, ?, ?, ?, ?)",
                           (file_id, tenant, filename, purpose, size, now))
        except BaseException:
            self._files.remove(file_id)
            raise
        return FileRecord(id=file_id, tenant=tenant, filename=filename, purpose=purpose,
                          size_bytes=size, created=now)

    def get_file(self, tenant: str, file_id: str) -> FileRecord:
        with self._transaction() as db:
            row = _file_row(db, tenant, file_id)
        return _file_record(row)

    def list_files(self, tenant: str, purpose: str = "", after: str | None = None,
                   limit: int = 50) -> list[FileRecord]:
        where, params = ["tenant = ?"], [tenant]
        if purpose:
            where.append("purpose = ?")
            params.append(purpose)
        with self._transaction() as db:
            if after is not None:
                cursor = _file_row(db, tenant, after, "; accepted as `after`: the id of the "
                                   "last file of the previous page")
                where.append("(created, id) < (?, ?)")
                params += [cursor["created"], cursor["id"]]
            rows = db.execute(f"SELECT * FROM files WHERE {' AND '.join(where)} "
                              "ORDER BY created DESC, id DESC LIMIT ?",
                              (*params, checked_limit(limit))).fetchall()
        return [_file_record(row) for row in rows]

    def delete_file(self, tenant: str, file_id: str) -> None:
        with self._transaction(write=True) as db:
            _file_row(db, tenant, file_id)
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self._files.remove(file_id)  # after the commit: a crash here leaves what the sweep removes

    def open_file(self, record: FileRecord) -> BinaryIO:
        return self._files.open(record.id)


def _file_record(row: Row) -> FileRecord:
    return FileRecord(id=row["id"], tenant=row["tenant"], filename=row["filename"],
                      purpose=row["purpose"], size_bytes=row["size_bytes"],
                      created=row["created"])


def _file_row(db: Connection, tenant: str, file_id: str, accepted: str = "") -> Row:
    row = db.execute("SELECT * FROM files WHERE id = ? AND tenant = ?",
                     (file_id, tenant)).fetchone() if is_file_id(file_id) else None
    if row is None:
        raise NotFound(f"file {file_id[:80]!r} not found{accepted}")
    return row
