"""The registry: tenants and their tokens and quotas, adapters with immutable versions and
provenance, fine-tuning jobs with their events and leases, the files tenants upload for jobs,
the idempotency keys of creating calls and the token use of a cluster's workers. The server
calls it from its request threads. `cotune.adapters.sql_registry` implements it on SQLite (the
embedded default) and on PostgreSQL (a cluster's), with the bytes in `stores`.

Names: tenants and adapters are 1-128 letters, digits, '.', '_' or '-', starting with a
letter or digit (so no name is a path). Versions count from 1 per adapter and are never
reused, even after a version is deleted. Times are seconds since the epoch (UTC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_EVENT_KINDS = ("state", "error", "progress", "evaluation", "checkpoint")
UNFINISHED_JOB_STATES = ("queued", "running")


class RegistryError(Exception):
    """A registry call refused; the message says what was wrong and what is accepted."""


class NotFound(RegistryError):
    pass


class AlreadyExists(RegistryError):
    pass


class InvalidName(RegistryError, ValueError):
    pass


class FailedPrecondition(RegistryError):
    """The call does not apply to the record as it is (deleting an admin tenant)."""


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached now (a PostgreSQL server restarting, the
    network between): the call did nothing, and may be retried."""


class QuotaExceeded(RegistryError):
    """A tenant's quota stops the call; `limit` names the quota field."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


class Repeated(RegistryError):
    """A creating call repeated with its idempotency key: `earlier` is what the first call
    created (a VersionRecord or a JobRecord); this one created nothing."""

    def __init__(self, earlier: VersionRecord | JobRecord):
        super().__init__(f"repeats an earlier call, which created {earlier!r}")
        self.earlier = earlier


IDEMPOTENT_CALLS = ("CreateAdapter", "CreateJob", "MergeAdapters")
IDEMPOTENCY_KEPT_S = 24 * 3600  # how long a key answers its retries
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class Idempotency:
    """What makes a creating call safe to retry: the caller's key, and the fingerprint of its
    request (a hash the server makes), which a retry must match."""

    key: str
    fingerprint: str

    def __post_init__(self):
        if not isinstance(self.key, str) or not _IDEMPOTENCY_KEY.fullmatch(self.key):
            raise ValueError(f"idempotency key {str(self.key)[:80]!r} is invalid; accepted: "
                             "1-128 of A-Z a-z 0-9 . _ : -")


def files_refusal(tenant: str, count: int) -> str:
    """Why `tenant`, with `count` files, may upload no more (QuotaExceeded("max_files"))."""
    return (f"tenant {tenant!r} has {count} files, the most this server keeps per tenant; "
            "delete a file you no longer need, or ask the operator to start the server with "
            "a higher --max-files-per-tenant")


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; 0 means no limit."""

    max_adapters: int = 0
    max_versions_per_adapter: int = 0
    max_concurrent_jobs: int = 0  # jobs queued or running
    max_queued_requests: int = 0  # generations in flight (enforced by the server)
    max_tokens_per_minute: int = 0  # prompt + generated tokens (enforced by the server)
    max_sessions: int = 0  # RL sessions open at once on a server (enforced by the server)


NO_LIMITS = Quotas()


@dataclass(frozen=True)
class TenantRecord:
    name: str
    admin: bool
    quotas: Quotas
    created: float


@dataclass(frozen=True)
class TokenRecord:
    id: str
    tenant: str
    description: str
    created: float
    revoked: bool


@dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    description: str
    labels: dict[str, str]
    latest_version: int
    version_count: int
    created: float
    updated: float


@dataclass(frozen=True)
class VersionRecord:
    """One immutable version. Its PEFT files (adapter_config.json +
    adapter_model.safetensors) are the blob `blob_id` of the blob store while the record
    exists: `Registry.version_dir` and `Registry.open_version_file` reach them."""

    tenant: str
    name: str
    version: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str  # of adapter_model.safetensors
    # source ("upload", "server_path" or "job"), base_fingerprint, parent_version,
    # dataset_fingerprint, hyperparameters (dict), job_id, metrics (dict of floats)
    provenance: dict
    created: float
    blob_id: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    adapter: str
    state: str  # one of JOB_STATES
    spec: dict  # what rebuilds the job's FinetuneSpec (JSON)
    error: str
    created: float
    updated: float
    versions: tuple[int, ...] = ()
    progress: dict = field(default_factory=dict)  # step, total_steps, tokens, loss, eval_loss
    owner: str = ""  # the worker that runs it (its --worker-id); "" before owners existed
    training_file: str = ""  # the id of the file it trains on; "" for data sent inline
    lease_until: float = 0.0  # the owner's hold on an unfinished job ends then, unless renewed


@dataclass(frozen=True)
class JobEventRecord:
    """One stored event of a job; `sequence` counts from 1 per job. `data` by `kind`:
    state {state}, error {error}, progress {step, total_steps, loss, tokens,
    tokens_per_second}, evaluation {step, metrics}, checkpoint {step, version, metrics}."""

    job_id: str
    sequence: int
    time: float
    kind: str  # one of JOB_EVENT_KINDS
    data: dict


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file; its bytes are in the file store while the record exists
    (`Registry.open_file`)."""

    id: str  # "file-" and 24 hex digits, made by the registry
    tenant: str
    filename: str  # the client's label, never a path
    purpose: str
    size_bytes: int
    created: float


@dataclass(frozen=True)
class TenantDeletion:
    """What deleting a tenant removed."""

    adapters: int
    versions: int
    tokens: int
    jobs: tuple[JobRecord, ...]  # every job of the tenant, as it was before the deletion
    files: int = 0


class Registry(Protocol):
    default_quotas: Quotas  # a new tenant's, where its creator sets none

    # --- tenants and tokens -------------------------------------------------------------
    def create_tenant(self, name: str, admin: bool = False,
                      quotas: Quotas | None = None) -> TenantRecord:
        """Raises InvalidName, AlreadyExists. quotas None: the registry's default quotas."""

    def get_tenant(self, name: str) -> TenantRecord:
        """Raises NotFound."""

    def list_tenants(self, after: str | None = None, limit: int = 50) -> list[TenantRecord]:
        """Tenants ordered by name, those after `after`."""

    def set_quotas(self, name: str, quotas: Quotas) -> TenantRecord:
        """Raises NotFound."""

    def issue_token(self, tenant: str, description: str = "",
                    token: str | None = None) -> tuple[TokenRecord, str]:
        """A new token for `tenant`: its record and the secret, "ct_<id>_<secret>", which is
        returned only here (the registry keeps a hash). `token`: a preset secret of that form
        (an operator's, from a Kubernetes Secret) instead of a fresh one. Raises NotFound,
        AlreadyExists (a token of that id exists), ValueError (a malformed preset)."""

    def revoke_token(self, token_id: str) -> bool:
        """False when it was revoked already; NotFound when no token has this id."""

    def tokens(self, tenant: str) -> list[TokenRecord]:
        """The tenant's tokens, revoked ones included, oldest first."""

    def authenticate(self, token: str) -> TenantRecord | None:
        """The tenant of a valid, unrevoked token; None otherwise. The secret is compared by
        hash in constant time; a malformed token is None, never an exception."""

    def delete_tenant(self, name: str) -> TenantDeletion:
        """Deletes tenant `name` with its tokens (they stop authenticating at once), its
        adapters with every version, its jobs with their events, and its files, in one
        transaction. The name may be
        created again: the new tenant starts empty and never reuses a version number of the
        old one. Raises NotFound, FailedPrecondition (an admin tenant: the server must keep
        its admins)."""

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        """At a first start: the `admin` tenant and its first token (`token`: a preset one),
        made only when the registry has no tenant at all, in one transaction, so that of
        workers starting together on one registry exactly one makes it. Returns the token, or
        None when the registry had tenants already."""

    # --- adapters and versions ----------------------------------------------------------
    def publish_version(self, tenant: str, name: str, files: Path, provenance: dict,
                        description: str | None = None,
                        labels: dict[str, str] | None = None,
                        idempotency: Idempotency | None = None,
                        job_owner: tuple[str, str] | None = None,
                        call: str = "CreateAdapter") -> VersionRecord:
        """Publishes the PEFT files in directory `files` (already validated by the caller) as
        the next version of `name`, creating the adapter when new. The files are copied into
        the store atomically: a crash at any moment leaves the whole version or none.
        description/labels, when given, replace the adapter's. `idempotency`: a key the tenant
        used for a `call` (CreateAdapter or MergeAdapters) in the last IDEMPOTENCY_KEPT_S
        raises Repeated with that call's version, and publishes nothing. `job_owner` (job id,
        worker): a job's version, published only while that worker owns the job, else
        FailedPrecondition (another worker took the job over). Raises InvalidName, NotFound
        (no such tenant), QuotaExceeded("max_adapters" | "max_versions_per_adapter"),
        ValueError (the key was used with another request)."""

    def get_adapter(self, tenant: str, name: str) -> AdapterRecord:
        """Raises NotFound (also for other tenants' adapters: nothing leaks)."""

    def list_adapters(self, tenant: str, name_prefix: str = "",
                      labels: dict[str, str] | None = None, after: str | None = None,
                      limit: int = 50) -> list[AdapterRecord]:
        """The tenant's adapters ordered by name, those after `after`, every label matching."""

    def get_version(self, tenant: str, name: str, version: int | None = None) -> VersionRecord:
        """version None: the newest. Raises NotFound."""

    def list_versions(self, tenant: str, name: str, after: int | None = None,
                      limit: int = 50) -> list[VersionRecord]:
        """Versions in ascending order, those after `after`. Raises NotFound."""

    def version_dir(self, version: VersionRecord) -> Path:
        """A local directory holding the version's PEFT files (a remote store fetches them
        into the worker's disk cache first). Raises FileNotFoundError (a version deleted
        meanwhile), BlobStore's StoreUnavailable."""

    def open_version_file(self, version: VersionRecord, name: str) -> BinaryIO:
        """One of the version's two files as a stream from the store (an export's)."""

    def delete_adapter(self, tenant: str, name: str, version: int | None = None) -> int:
        """Deletes one version, or the adapter with every version (version None); returns
        how many versions went. Deleting the last version deletes the adapter. Raises
        NotFound."""

    # --- jobs ---------------------------------------------------------------------------
    def create_job(self, tenant: str, adapter: str, spec: dict, owner: str = "",
                   training_file: str = "", idempotency: Idempotency | None = None,
                   lease_until: float = 0.0) -> JobRecord:
        """A queued job with a fresh id ("job-<hex>"), run by worker `owner` under a lease
        until `lease_until`, and its first event (state queued). `training_file`: the id of
        the file it trains on, recorded only. `idempotency`: as publish_version's, for a
        CreateJob (Repeated carries the first call's job). Raises InvalidName,
        QuotaExceeded("max_concurrent_jobs") when the tenant has that many queued or running,
        ValueError (the key was used with another request)."""

    def repeated(self, tenant: str, call: str,
                 idempotency: Idempotency) -> VersionRecord | JobRecord | None:
        """What the tenant's earlier `call` (one of IDEMPOTENT_CALLS) with this key created,
        or None when the key is new: lets a server answer a retry before it does the call's
        work. Raises ValueError (the key was used with another request), NotFound (what it
        created was deleted since)."""

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord:
        """Raises NotFound (also for other tenants' jobs). `tenant` None: any tenant's (for
        an admin's call)."""

    def list_jobs(self, tenant: str | None, state: str | None = None, after: str | None = None,
                  limit: int = 50) -> list[JobRecord]:
        """The tenant's jobs, newest first (ordered by creation, then id), after `after` (an
        id). `tenant` None: every tenant's (for an admin's call)."""

    def update_job(self, job_id: str, *, state: str | None = None, error: str | None = None,
                   version: int | None = None, progress: dict | None = None) -> JobRecord:
        """Records a state change, an error, a published version (appended) and/or the
        latest progress (replaces the previous). A change of state is stored as a "state"
        event, and an error set with it as an "error" event, in the same transaction: a job's
        events never miss a state it was in. Raises NotFound."""

    def unfinished_jobs(self, owner: str | None = None,
                        lease_until: float = 0.0) -> list[JobRecord]:
        """Queued and running jobs, oldest first: what a restart resumes. None: every
        worker's; a worker id: that worker's, after it claimed the unowned ones (jobs of a
        registry from before owners) in the same transaction, so that of workers starting
        together on one registry exactly one resumes each; their leases run until
        `lease_until`."""

    def renew_leases(self, owner: str, job_ids: list[str], lease_until: float) -> list[str]:
        """Extends to `lease_until` the lease of each job of `job_ids` that is unfinished and
        still `owner`'s; returns the others (another worker took it over, or it ended or went
        with its tenant): the owner stops running those."""

    def claim_expired_jobs(self, owner: str, now: float,
                           lease_until: float) -> list[JobRecord]:
        """Unfinished jobs whose owner's lease ended before `now` (a worker that died or lost
        the database), made `owner`'s until `lease_until`, oldest first, in one transaction:
        of workers claiming together, one gets each job."""

    def add_job_event(self, job_id: str, kind: str, data: dict, time: float) -> int:
        """Stores an event of the job (JobEventRecord); returns its sequence. Raises NotFound
        (a job deleted with its tenant), ValueError (an unknown kind)."""

    def list_job_events(self, tenant: str | None, job_id: str, before: int | None = None,
                        limit: int = 50) -> list[JobEventRecord]:
        """The job's events, newest first, those with a sequence below `before`. Raises
        NotFound (also for other tenants' jobs). `tenant` None: any tenant's job (for an
        admin's call)."""

    # --- usage --------------------------------------------------------------------------
    def exchange_token_usage(self, worker: str, used: dict[str, int],
                             now: float) -> dict[str, int]:
        """Replaces worker `worker`'s report with `used` (tenant -> tokens it admitted in the
        last minute) and returns, per tenant, the tokens the other workers reported within
        the last minute. Each worker calls it every few seconds, so a tenant's use across the
        cluster is its use here plus what the others reported, seconds ago: the cluster may
        pass a tenant's max_tokens_per_minute by what the other workers admit between two
        exchanges, never more. A worker that stopped reporting counts no more a minute later."""

    # --- files --------------------------------------------------------------------------
    def add_file(self, tenant: str, filename: str, purpose: str, staged: Path,
                 max_files: int = 0) -> FileRecord:
        """Moves the file `staged` (on the registry's filesystem, already checked by the
        caller) into the store as a new file of `tenant`, atomically: a crash leaves the
        whole file and its record or neither. Raises NotFound (no such tenant),
        QuotaExceeded("max_files") when the tenant has `max_files` files (0: no limit)."""

    def get_file(self, tenant: str, file_id: str) -> FileRecord:
        """Raises NotFound (also for other tenants' files and for ids of no file's form)."""

    def open_file(self, file: FileRecord) -> BinaryIO:
        """The file's bytes as a stream from the store; FileNotFoundError when it was
        deleted since the record was read (an open stream outlives a deletion)."""

    def list_files(self, tenant: str, purpose: str = "", after: str | None = None,
                   limit: int = 50) -> list[FileRecord]:
        """The tenant's files (of `purpose`, "" any), newest first, after `after` (an id)."""

    def delete_file(self, tenant: str, file_id: str) -> None:
        """Deletes the record, then the bytes. Raises NotFound."""

    def close(self) -> None:
        ...
