"""Fine-tuning jobs in the registry with their events, and the claim of unowned jobs by
the worker that resumes them (jobs.owner: the id of the worker that runs the job, '' while none
does)."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time

from cotune.adapters.registry import (
    JOB_EVENT_KINDS,
    JOB_STATES,
    UNFINISHED_JOB_STATES,
    Idempotency,
    JobEventRecord,
    JobRecord,
    NotFound,
    QuotaExceeded,
    Repeated,
)
from cotune.adapters.sql_database import (
    Connection,
    Row,
    SqlDatabase,
    check_name,
    checked_limit,
)
from cotune.adapters.sql_idempotency import earlier, remember
from cotune.adapters.sql_tenants import load_tenant


class SqlJobs(SqlDatabase):
    """The job calls of the Registry."""

    def create_job(self, tenant: str, adapter: str, spec: dict, owner: str = "",
                   training_file: str = "", idempotency: Idempotency | None = None,
                   lease_until: float = 0.0) -> JobRecord:
        check_name("adapter", adapter)
        now = time.time()
        job = JobRecord(id=f"job-{secrets.token_hex(8)}", tenant=tenant, adapter=adapter,
                        state="queued", spec=json.loads(json.dumps(spec)), error="",
                        created=now, updated=now, owner=owner, training_file=training_file,
                        lease_until=lease_until)
        with self._transaction(write=True) as db:
            if idempotency is not None and \
                    (done := earlier(db, tenant, "CreateJob", idempotency)):
                raise Repeated(job_record(db.execute("SELECT * FROM jobs WHERE id = ?",
                                                     (done["job"],)).fetchone()))
            limit = load_tenant(db, tenant).quotas.max_concurrent_jobs
            count = db.execute(f"SELECT COUNT(*) FROM jobs WHERE tenant = ? AND {_UNFINISHED}",
                               (tenant, *UNFINISHED_JOB_STATES)).fetchone()[0]
            if 0 < limit <= count:
                raise QuotaExceeded("max_concurrent_jobs", (
                    f"tenant {tenant!r} has {count} jobs queued or running, its "
                    f"max_concurrent_jobs quota is {limit}; wait for one to finish, cancel one, "
                    "or ask an administrator to raise max_concurrent_jobs"))
            db.execute("INSERT INTO jobs (id, tenant, adapter, state, spec, error, created, "
                       "updated, versions, progress, owner, training_file, lease_until) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, '[]', '{}', ?, ?, ?)",
                       (job.id, tenant, adapter, job.state, json.dumps(job.spec), job.error,
                        now, now, owner, training_file, lease_until))
            _insert_event(db, job.id, "state", {"state": job.state}, now)
            if idempotency is not None:
                remember(db, tenant, "CreateJob", idempotency, {"job": job.id}, now)
        return job

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord:
        where, params = _of_tenant(tenant)
        with self._transaction() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE id = ? AND {where}",
                             (job_id, *params)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return job_record(row)

    def list_jobs(self, tenant: str | None, state: str | None = None, after: str | None = None,
                  limit: int = 50) -> list[JobRecord]:
        of_tenant, tenant_params = _of_tenant(tenant)
        where, params = [of_tenant], list(tenant_params)
        if state is not None:
            where.append("state = ?")
            params.append(_checked_state(state))
        with self._transaction() as db:
            if after is not None:
                cursor = db.execute(f"SELECT created, id FROM jobs WHERE id = ? AND {of_tenant}",
                                    (after, *tenant_params)).fetchone()
                if cursor is None:
                    raise NotFound(f"job {after!r} not found; accepted as `after`: the id of "
                                   "the last job of the previous page")
                where.append("(created, id) < (?, ?)")
                params += [cursor["created"], cursor["id"]]
            rows = db.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} "
                              "ORDER BY created DESC, id DESC LIMIT ?",
                              (*params, checked_limit(limit))).fetchall()
        return [job_record(row) for row in rows]

    def update_job(self, job_id: str, *, state: str | None = None, error: str | None = None,
                   version: int | None = None, progress: dict | None = None) -> JobRecord:
        if state is not None:
            _checked_state(state)
        with self._transaction(write=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            job = job_record(row)
            job = dataclasses.replace(
                job, state=state or job.state, updated=time.time(),
                error=job.error if error is None else error,
                versions=job.versions if version is None else (*job.versions, version),
                progress=job.progress if progress is None else json.loads(json.dumps(progress)))
            db.execute("UPDATE jobs SET state = ?, error = ?, versions = ?, progress = ?, "
                       "updated = ? WHERE id = ?",
                       (job.state, job.error, json.dumps(job.versions), json.dumps(job.progress),
                        job.updated, job_id))
            if job.state != row["state"]:
                _insert_event(db, job_id, "state", {"state": job.state}, job.updated)
                if error:
                    _insert_event(db, job_id, "error", {"error": error}, job.updated)
        return job

    def add_job_event(self, job_id: str, kind: str, data: dict, time: float) -> int:
        if kind not in JOB_EVENT_KINDS:
            raise ValueError(f"job event kind {kind!r} is invalid; accepted: "
                             f"{', '.join(JOB_EVENT_KINDS)}")
        with self._transaction(write=True) as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"job {job_id!r} not found")
            return _insert_event(db, job_id, kind, data, time)

    def list_job_events(self, tenant: str | None, job_id: str, before: int | None = None,
                        limit: int = 50) -> list[JobEventRecord]:
        of_tenant, params = _of_tenant(tenant)
        with self._transaction() as db:
            if db.execute(f"SELECT 1 FROM jobs WHERE id = ? AND {of_tenant}",
                          (job_id, *params)).fetchone() is None:
                raise NotFound(f"job {job_id!r} not found")
            rows = db.execute("SELECT * FROM job_events WHERE job_id = ? AND sequence < ? "
                              "ORDER BY sequence DESC LIMIT ?",
                              (job_id, 2**63 - 1 if before is None else before,
                               checked_limit(limit))).fetchall()
        return [JobEventRecord(job_id=row["job_id"], sequence=row["sequence"], time=row["time"],
                               kind=row["kind"], data=json.loads(row["data"])) for row in rows]

    def unfinished_jobs(self, owner: str | None = None,
                        lease_until: float = 0.0) -> list[JobRecord]:
        with self._transaction(write=owner is not None) as db:
            if owner is None:
                rows = db.execute(f"SELECT * FROM jobs WHERE {_UNFINISHED} ORDER BY created, id",
                                  UNFINISHED_JOB_STATES).fetchall()
            else:
                db.execute(f"UPDATE jobs SET owner = ? WHERE owner = '' AND {_UNFINISHED}",
                           (owner, *UNFINISHED_JOB_STATES))
                db.execute(f"UPDATE jobs SET lease_until = ? WHERE owner = ? AND {_UNFINISHED}",
                           (lease_until, owner, *UNFINISHED_JOB_STATES))
                rows = db.execute(f"SELECT * FROM jobs WHERE owner = ? AND {_UNFINISHED} "
                                  "ORDER BY created, id", (owner, *UNFINISHED_JOB_STATES))
                rows = rows.fetchall()
        return [job_record(row) for row in rows]

    def renew_leases(self, owner: str, job_ids: list[str], lease_until: float) -> list[str]:
        held = []
        with self._transaction(write=True) as db:
            for job_id in job_ids:
                if db.execute(f"UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND "
                              f"{_UNFINISHED}", (lease_until, job_id, owner,
                                                 *UNFINISHED_JOB_STATES)).rowcount:
                    held.append(job_id)
        return [job_id for job_id in job_ids if job_id not in held]

    def claim_expired_jobs(self, owner: str, now: float,
                           lease_until: float) -> list[JobRecord]:
        with self._transaction(write=True) as db:
            ids = [row[0] for row in db.execute(
                f"SELECT id FROM jobs WHERE {_UNFINISHED} AND owner != ? AND lease_until < ? "
                "ORDER BY created, id", (*UNFINISHED_JOB_STATES, owner, now))]
            for job_id in ids:
                db.execute("UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ?",
                           (owner, lease_until, job_id))
            return [job_record(db.execute("SELECT * FROM jobs WHERE id = ?",
                                          (job_id,)).fetchone()) for job_id in ids]


_UNFINISHED = f"state IN ({', '.join('?' * len(UNFINISHED_JOB_STATES))})"


def _of_tenant(tenant: str | None) -> tuple[str, list]:
    """The condition on jobs.tenant, and its parameters: None is every tenant."""
    return ("tenant = ?", [tenant]) if tenant is not None else ("1 = 1", [])


def _insert_event(db: Connection, job_id: str, kind: str, data: dict,
                  time: float) -> int:
    sequence = db.execute("SELECT COALESCE(MAX(sequence), 0) + 1 FROM job_events "
                          "WHERE job_id = ?", (job_id,)).fetchone()[0]
    db.execute("INSERT INTO job_events (job_id, sequence, time, kind, data) "
               "VALUES (?, ?, ?, ?, ?)", (job_id, sequence, time, kind, json.dumps(data)))
    return sequence


def job_record(row: Row) -> JobRecord:
    return JobRecord(id=row["id"], tenant=row["tenant"], adapter=row["adapter"],
                     state=row["state"], spec=json.loads(row["spec"]), error=row["error"],
                     created=row["created"], updated=row["updated"],
                     versions=tuple(json.loads(row["versions"])),
                     progress=json.loads(row["progress"]), owner=row["owner"],
                     training_file=row["training_file"], lease_until=row["lease_until"])


def _checked_state(state: str) -> str:
    if state not in JOB_STATES:
        raise ValueError(f"job state {state!r} is invalid; accepted: {', '.join(JOB_STATES)}")
    return state
