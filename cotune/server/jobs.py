"""Fine-tuning jobs of every tenant: started in the shared runtime, followed into the
registry (progress, each checkpoint published as a new adapter version, the end state) and
broadcast to watchers. A job's directory holds its data and the trainer's checkpoints:

  jobs/<id>/data.jsonl      the training data, as the job received it
  jobs/<id>/parent/         the version the job continues (PEFT files), if it continues one
  jobs/<id>/out/<adapter>/  the trainer's versions and their training state

A restart resumes every queued or running job of this worker (its owner, --worker-id) from its
newest checkpoint, and publishes any checkpoint a crash left unpublished; a job that cannot be
resumed fails with the reason. Workers that share a registry share the jobs directory too: a
job's directory is its own id's.

The owner holds each job it runs under a lease in the registry, renewed every third of
`lease_s`. A worker that dies (or loses the database) longer than that loses its jobs to the
first other worker that claims them, which resumes each from its newest checkpoint; an owner
that finds its lease taken stops the job here and records nothing more of it.

A job's training state (`v{k}.state/`, the optimizer's moments: about twice the adapter's size)
is kept for its newest `keep_states` versions only; an older one goes once the registry has its
version. A job that cannot be followed (a version its tenant's quota refuses, a registry error)
fails with the reason, in the registry and to its watchers, and stops training.

A job's events are stored in the registry as they happen (ListJobEvents reads them back):
every state change, error, evaluation and checkpoint, and of its progress events about
PROGRESS_EVENTS_KEPT spread evenly over its steps, so that a long job stores a bounded number.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cotune.adapters.blob_store import StoreUnavailable
from cotune.adapters.durable import write_atomically
from cotune.adapters.job_files import JobFiles, LocalJobFiles
from cotune.adapters.peft_format import AdapterMismatch, LoraAdapter
from cotune.adapters.registry import (
    UNFINISHED_JOB_STATES,
    FailedPrecondition,
    Idempotency,
    JobRecord,
    NotFound,
    QuotaExceeded,
    Registry,
    RegistryError,
    RegistryUnavailable,
    TenantRecord,
    VersionRecord,
)
from cotune.engine.broadcast import END, Broadcast
from cotune.engine.checkpoint import latest_version
from cotune.engine.finetune_spec import FinetuneSpec
from cotune.engine.job import Job, JobEvent
from cotune.engine.runtime import Runtime
from cotune.engine.training_data import DataError
from cotune.server.convert import job_event
from cotune.server.job_leases import JobLeases
from cotune.server.job_specs import continued_fields, spec_of
from cotune.server.metrics import Metrics
from cotune.server.names import reference, runtime_key
from cotune.v1 import training_pb2

log = logging.getLogger("cotune.server")
PROGRESS_EVENTS_KEPT = 100  # stored per job, besides the first and last step's


@dataclass
class LiveJob:
    job: Job
    spec: FinetuneSpec
    record: JobRecord
    labels: tuple[str, str]  # (tenant, adapter) as the metrics name them
    events: Broadcast = field(default_factory=Broadcast)  # of training_pb2.JobEvent
    progress: dict = field(default_factory=dict)  # as the registry stores it
    ended: threading.Event = field(default_factory=threading.Event)
    progress_time: float | None = None  # when this run last updated `progress`
    abandoned: bool = False  # another worker took the job over: record nothing more
    kept: set = field(default_factory=set)  # checkpoints in the job files, for a taker

    def advance(self, data: dict, time: float) -> float:
        """Records a progress event; returns the training tokens per second since the
        previous one (0 for the first of this run: a resumed job's recorded progress is
        from a run before)."""
        rate = 0.0
        if self.progress_time is not None and time > self.progress_time:
            rate = (data["tokens"] - self.progress["tokens"]) / (time - self.progress_time)
        self.progress.update({k: data[k] for k in ("step", "total_steps", "loss", "tokens")})
        self.progress_time = time
        return rate


class JobManager:
    def __init__(self, runtime: Runtime, registry: Registry, jobs_dir: Path, metrics: Metrics,
                 worker_id: str, keep_states: int = 2, lease_s: float = 30.0,
                 job_files: JobFiles | None = None):
        if keep_states < 1:
            raise ValueError(f"keep_states {keep_states} not accepted; accepted: 1 or more (a "
                             "job resumes from its newest training state)")
        self.runtime, self.registry, self.jobs_dir = runtime, registry, jobs_dir
        self.metrics, self.worker_id, self.keep_states = metrics, worker_id, keep_states
        self.leases = JobLeases(registry, worker_id, lease_s, self._running, self._lost,
                                self._resume)
        self.job_files = job_files or LocalJobFiles()
        self._live: dict[str, LiveJob] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def create(self, tenant: TenantRecord, adapter: str, fields: dict, data: bytes,
               from_scratch: bool = False, training_file: str = "",
               idempotency: Idempotency | None = None) -> JobRecord:
        """A job training `adapter` on `data`, read from the tenant's file `training_file`
        when it names one. An existing adapter continues from its newest version
        (continued_fields), unless `from_scratch`. Raises Repeated, starting nothing, when
        `idempotency`'s key made a job already."""
        parent = None if from_scratch else self._newest_version(tenant.name, adapter)
        if parent is not None:
            fields = continued_fields(parent, fields)
        spec = spec_of(adapter, fields, self.jobs_dir, tenant.name)  # refuses bad settings first
        max_rank = self.runtime.engine.config.max_rank
        if spec.lora.rank > max_rank:  # it would train, then publish versions nothing can serve
            raise AdapterMismatch(
                f"rank {spec.lora.rank} exceeds max_rank {max_rank} of this server; lower the "
                f"rank to at most {max_rank} or start the server with --max-rank "
                f"{spec.lora.rank}")
        record = self.registry.create_job(tenant.name, adapter, fields, self.worker_id,
                                          training_file, idempotency,
                                          lease_until=self.leases.until())
        job_dir = self.jobs_dir / record.id
        job_dir.mkdir(parents=True)
        write_atomically(job_dir / "data.jsonl", data)
        try:
            if parent is not None:  # kept with the job: a resume needs them after a delete
                shutil.copytree(self.registry.version_dir(parent), job_dir / "parent")
            self._keep(record.id, ["data.jsonl", "parent"])
            self._start(record)
        except Exception as e:  # bad data: the job ends failed, and the caller hears why
            # in the data's words, not the server's paths; the data goes with the job
            name = training_file or "training_data"
            error = DataError(str(e).replace(str(job_dir / "data.jsonl"), name)) \
                if isinstance(e, DataError) else e
            self.registry.update_job(record.id, state="failed", error=str(error))
            shutil.rmtree(job_dir, ignore_errors=True)
            raise error from None
        return self.registry.get_job(tenant.name, record.id)

    def _newest_version(self, tenant: str, adapter: str) -> VersionRecord | None:
        try:
            return self.registry.get_version(tenant, adapter)
        except NotFound:
            return None

    def resume_unfinished(self) -> None:
        """Called once at start: every job of this worker's that a stop or a crash interrupted
        goes on (workers sharing the registry resume their own). One that cannot (settings no
        longer accepted, its data or checkpoints spoilt) fails with the reason."""
        for record in self.registry.unfinished_jobs(self.worker_id,
                                                    lease_until=self.leases.until()):
            self._resume(record)
        self.leases.start()

    def _running(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def _lost(self, job_id: str) -> None:
        """A job whose lease this worker could not renew stops here: cancelled (from another
        worker), it ends as such; taken over, it records nothing more here."""
        live = self.live(job_id)
        if live is None or live.abandoned:
            return
        try:
            record = self.registry.get_job(None, live.record.id)
            moved = record.state in UNFINISHED_JOB_STATES and record.owner != self.worker_id
        except NotFound:  # gone with its tenant: its follower finds out
            moved = False
        if moved:
            log.warning("job %s is now %s's; it stops here", record.id, record.owner)
            live.abandoned = True
        live.job.cancel()

    def _resume(self, record: JobRecord) -> None:
        try:
            self._start(record)
            log.info("resumed %s (%s/%s)", record.id, record.tenant, record.adapter)
        except Exception as e:  # noqa: BLE001 - one job's failure does not stop the rest
            log.exception("resuming %s failed; the job fails", record.id)
            self.registry.update_job(record.id, state="failed",
                                     error=f"the job could not be resumed: {e}")

    def live(self, job_id: str) -> LiveJob | None:
        with self._lock:
            return self._live.get(job_id)

    def cancel(self, tenant: str | None, job_id: str) -> JobRecord:
        """Cancelled at once in the registry, without waiting for a step: the engine stops
        the job at its next step boundary (its owner's, when another worker runs it), and
        the job's last events follow. `tenant` None: any tenant's job (an admin's call)."""
        record = self.registry.get_job(tenant, job_id)  # NotFound for others' jobs
        if record.state not in ("queued", "running"):
            return record
        live = self.live(job_id)
        if live is not None:
            live.job.cancel()
        return self.registry.update_job(job_id, state="cancelled")

    def stop(self) -> None:
        """Before the runtime closes: the jobs it then ends stay running in the registry, so
        the next start resumes them (or, past their lease, another worker)."""
        self._stopping = True
        self.leases.stop()

    def join(self, timeout: float) -> None:
        """After the runtime closed: waits until every job's last events (its shutdown
        version among them) are in the registry, which may then close."""
        deadline = time.monotonic() + timeout
        with self._lock:
            live = list(self._live.values())
        for job in live:
            job.ended.wait(max(0.0, deadline - time.monotonic()))

    def delete_tenant(self, name: str):
        """Deletes tenant `name` with its tokens, adapters and jobs (Registry.delete_tenant);
        its jobs running here stop at their next step. Every deleted job's directory goes: a
        running one's once its engine has stopped it (its follower, here or on the worker that
        runs it, finds the job gone). Returns the registry's TenantDeletion."""
        deletion = self.registry.delete_tenant(name)
        for record in deletion.jobs:
            self._forget(record.id)
            live = self.live(record.id)
            if live is not None:
                live.job.cancel()
            elif record.state not in UNFINISHED_JOB_STATES or \
                    record.owner in ("", self.worker_id):  # no engine runs it
                shutil.rmtree(self.jobs_dir / record.id, ignore_errors=True)
        return deletion

    def _start(self, record: JobRecord) -> None:
        job_dir = self.jobs_dir / record.id
        spec = spec_of(record.adapter, record.spec, job_dir, record.tenant)  # settings first
        if not job_dir.is_dir() and not self.job_files.fetch(record.id, job_dir):
            raise RuntimeError(
                "its files are on the disk of the worker that ran it, which this worker does "
                "not reach; accepted: workers that share --blobs s3://... (or one --data-dir)")
        # served from the registry, by tenant and registry version (_cache): not by name
        job = self.runtime.finetune(spec, job_id=record.id, serve_by_name=False)
        labels = (record.tenant, self.metrics.adapter_label(record.tenant, record.adapter))
        live = LiveJob(job, spec, record, labels, progress=dict(record.progress))
        events = job.subscribe()
        with self._lock:
            self._live[record.id] = live
        try:
            live.progress["published"] = self._published_by(record)
            self._publish_new_versions(live)  # checkpoints a crash left unpublished
            self.registry.update_job(record.id, state="running")
        except BaseException:  # the job must not train on with no one following it
            job.cancel()
            job.unsubscribe(events)
            with self._lock:
                self._live.pop(record.id, None)
            raise
        threading.Thread(target=self._follow, args=(live, events), daemon=True,
                         name=f"follow-{record.id}").start()

    def _follow(self, live: LiveJob, events: queue.Queue) -> None:
        """Records the job's events until its last. Any failure to record one (a version the
        tenant's quota refuses, a registry error, a number the wire cannot carry) fails the
        job."""
        job_id = live.record.id
        try:
            while (event := events.get()) is not END:
                self._record(live, event)
        except Exception as e:  # noqa: BLE001 - the job must not stay running unfollowed
            log.exception("following %s failed; the job fails", job_id)
            deleted = self._fail(live, e)
            while events.get() is not END:  # until the engine has stopped the job
                pass
            if deleted:
                shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
        finally:
            with self._lock:
                self._live.pop(job_id, None)
            live.ended.set()

    def _fail(self, live: LiveJob, error: Exception) -> bool:
        """Stops the job (at the engine's next step) and records it failed, which frees its
        place among the tenant's max_concurrent_jobs; its watchers hear why. Returns whether
        the job is gone from the registry (deleted with its tenant while it ran)."""
        job_id, now = live.record.id, time.time()
        reason = str(error) if isinstance(error, RegistryError) else \
            f"internal error while following the job ({type(error).__name__}: {error}); see " \
            "the server log"
        live.job.cancel()
        self.metrics.job_loss.remove(*live.labels)
        try:
            self.registry.update_job(job_id, state="failed", error=reason)
            self._forget(job_id)
            self.metrics.jobs_finished.labels(live.record.tenant, "failed").inc()
        except NotFound:
            live.events.close(_state(job_id, now, "cancelled"),
                              _error(job_id, now, "the job was deleted with its tenant"))
            return True
        except Exception:  # noqa: BLE001 - the registry itself fails: the log says so
            log.exception("recording %s as failed did not succeed", job_id)
        live.events.close(_state(job_id, now, "failed"), _error(job_id, now, reason))
        return False

    def _record(self, live: LiveJob, event: JobEvent) -> None:
        job_id = live.record.id
        if live.abandoned:  # its new owner records it; here its watchers hear where it went
            if event.kind == "state":
                live.events.close(_error(job_id, event.time, "the job moved to another worker "
                                         "of the cluster; watch it again there"))
            return
        if event.kind == "progress":
            self._count_progress(live, event.data)
            rate = live.advance(event.data, event.time)
            try:
                if self.registry.get_job(live.record.tenant, job_id).state == "cancelled":
                    live.job.cancel()  # by a worker sharing the registry, while this one was out
                self.registry.update_job(job_id, progress=live.progress)
            except RegistryUnavailable as e:  # the next report replaces this one anyway
                log.warning("job %s: progress not recorded: %s", job_id, e)
            data = {k: event.data[k] for k in ("step", "total_steps", "loss", "tokens")}
            self._emit(live, event.time, "progress", {**data, "tokens_per_second": rate},
                       store=_kept(data["step"], data["total_steps"]))
        elif event.kind == "checkpoint":
            metrics = {k: float(v) for k, v in event.data["metrics"].items()
                       if isinstance(v, (int, float))}
            if "eval_loss" in metrics:
                live.progress["eval_loss"] = metrics["eval_loss"]
                self.metrics.job_eval_loss.labels(*live.labels).set(metrics["eval_loss"])
            step = event.data["step"]
            self._emit(live, event.time, "evaluation", {"step": step, "metrics": metrics})
            self._keep_checkpoints(live)
            new = self._publish_new_versions(live, retry_later=True)
            self._cache(live, event.data["version"], event.data["adapter"])
            for version in new:
                self._emit(live, event.time, "checkpoint", {
                    "step": step, "version": reference(live.record.adapter, version),
                    "metrics": metrics})
        elif event.kind == "state":
            state, error = event.data["state"].value, event.data["error"] or ""
            if self._stopping and state == "cancelled":
                live.events.close(_error(job_id, event.time, "the server is shutting down; "
                                         "the job resumes when it starts again"))
                return
            if state == "succeeded":  # what the store refused before, now or never
                self._publish_new_versions(live)
            self.registry.update_job(job_id, state=state, error=error)
            self._forget(job_id)  # ended: no worker takes it over
            self.metrics.jobs_finished.labels(live.record.tenant, state).inc()
            self.metrics.job_loss.remove(*live.labels)  # the gauge is of running jobs
            final = [_state(job_id, event.time, state)]
            if error:
                final.append(_error(job_id, event.time, error))
            live.events.close(*final)

    def _emit(self, live: LiveJob, time: float, kind: str, data: dict,
              store: bool = True) -> None:
        """Stores an event of the job (unless a progress event thinned out) and sends it to
        its watchers. State changes and errors are stored by the registry itself, with the
        change (Registry.update_job): here they are only sent."""
        if store:
            self.registry.add_job_event(live.record.id, kind, data, time)
        live.events.publish(job_event(live.record.id, time, kind, data))

    def _count_progress(self, live: LiveJob, progress: dict) -> None:
        """Steps and tokens since the last report (a resumed job may report fewer than it had
        recorded: it went back to its last version)."""
        m = self.metrics
        steps = progress["step"] - live.progress.get("step", progress["step"] - 1)
        tokens = progress["tokens"] - live.progress.get("tokens", 0)
        m.job_steps.labels(*live.labels).inc(max(0, steps))
        m.training_tokens.labels(*live.labels).inc(max(0, tokens))
        if progress["loss"] is not None:
            m.job_loss.labels(*live.labels).set(progress["loss"])

    def _cache(self, live: LiveJob, trainer_version: int, adapter: LoraAdapter) -> None:
        """Puts the weights of a version the job just published into host memory under the
        key Generate resolves its registry version to (InferenceService._adapter): its
        first request reads no file."""
        version = live.progress["published"].get(str(trainer_version))
        if version is not None:
            self.runtime.cache_adapter(
                runtime_key(live.record.tenant, live.record.adapter, version), adapter)

    def _published_by(self, record: JobRecord) -> dict[str, int]:
        """Trainer version -> registry version of what this job published, read from the
        versions' provenance: right even when a crash came between publishing a version and
        recording it on the job."""
        published, after = {}, None
        while True:
            try:
                page = self.registry.list_versions(record.tenant, record.adapter, after, 1000)
            except NotFound:  # the adapter does not exist yet, or was deleted
                return published
            for version in page:
                if version.provenance.get("job_id") == record.id:
                    published[str(version.provenance["trainer_version"])] = version.version
            if len(page) < 1000:
                return published
            after = page[-1].version

    def _publish_new_versions(self, live: LiveJob, retry_later: bool = False) -> list[int]:
        """Publishes the trainer's checkpoints not yet in the registry, oldest first; returns
        their registry versions. `retry_later`: when the registry or its store is unavailable,
        the rest wait for the next call (the job's next checkpoint) instead of failing the
        job; their training states stay until then."""
        spec, record = live.spec, live.record
        published: dict = live.progress.setdefault("published", {})  # trainer k -> registry
        new = []
        for k in range(1, latest_version(spec.adapter_dir) + 1):
            if str(k) in published or not (spec.adapter_dir / f"v{k}").is_dir():
                continue
            trained = json.loads((spec.adapter_dir / f"v{k}.state" / "provenance.json")
                                 .read_text())
            provenance = {"source": "job", "job_id": record.id, "trainer_version": k,
                          "base_fingerprint": trained.get("base_fingerprint", ""),
                          "parent_version": published.get(str(k - 1),
                                                          record.spec.get("parent_version", 0)),
                          "dataset_fingerprint": trained.get("dataset_fingerprint", ""),
                          "hyperparameters": record.spec, "metrics": trained.get("metrics", {})}
            try:
                version = self.registry.publish_version(
                    record.tenant, record.adapter, spec.adapter_dir / f"v{k}", provenance,
                    job_owner=(record.id, self.worker_id)).version
            except FailedPrecondition as e:  # its lease ran out: the new owner publishes
                log.warning("job %s stops here: %s", record.id, e)
                live.abandoned = True
                live.job.cancel()
                return new
            except QuotaExceeded as e:
                raise QuotaExceeded(e.limit, f"publishing version {k} of the job failed: {e}") \
                    from e
            except (RegistryUnavailable, StoreUnavailable) as e:
                if not retry_later:
                    raise RegistryUnavailable(f"publishing version {k} of the job failed: {e}") \
                        from e
                log.warning("job %s: version %d waits for the next checkpoint: %s",
                            record.id, k, e)
                break
            published[str(k)] = version
            self.registry.update_job(record.id, version=version, progress=live.progress)
            new.append(version)
        self._prune_states(live)
        return new

    def _prune_states(self, live: LiveJob) -> None:
        """Removes the training state of published versions past the newest `keep_states`:
        a job resumes from its newest, and an unpublished version keeps its state (its
        provenance is there) until it is published."""
        adapter_dir, published = live.spec.adapter_dir, live.progress["published"]
        states = [k for k in range(1, latest_version(adapter_dir) + 1)
                  if (adapter_dir / f"v{k}.state").is_dir()]
        for k in states[:-self.keep_states]:
            if str(k) in published:
                shutil.rmtree(adapter_dir / f"v{k}.state")
                self._forget(live.record.id, [self._in_job_dir(live, f"v{k}.state")])

    def _keep_checkpoints(self, live: LiveJob) -> None:
        """Stores the checkpoints not stored yet in the job files, each state before its
        version (resume takes the newest version that has both), for a worker that may take
        the job over; what the store refuses now waits for the next checkpoint."""
        if not self.leases.holds():  # another worker may own the job and write its files now
            log.warning("job %s: its lease was not renewed in time; its checkpoints are "
                        "stored once it is (or the job stops here if another worker took "
                        "it over)", live.record.id)
            return
        adapter_dir = live.spec.adapter_dir
        new = [k for k in range(1, latest_version(adapter_dir) + 1)
               if k not in live.kept and (adapter_dir / f"v{k}.state").is_dir()]
        if new and self._keep(live.record.id, [self._in_job_dir(live, f"v{k}{part}")
                                               for k in new for part in (".state", "")]):
            live.kept.update(new)

    def _in_job_dir(self, live: LiveJob, name: str) -> str:
        """The path of the adapter directory's `name`, as the job files name it."""
        return (live.spec.adapter_dir / name).relative_to(self.jobs_dir / live.record.id) \
            .as_posix()

    def _keep(self, job_id: str, names: list[str]) -> bool:
        try:
            self.job_files.keep(job_id, self.jobs_dir / job_id, names)
        except StoreUnavailable as e:  # the job trains on; only a takeover would miss them
            log.warning("job %s: %s not stored for a takeover: %s", job_id, names, e)
            return False
        return True

    def _forget(self, job_id: str, names: list[str] | None = None) -> None:
        try:
            self.job_files.forget(job_id, names)
        except StoreUnavailable as e:
            log.warning("job %s: stored files not removed: %s", job_id, e)


def _kept(step: int, total_steps: int) -> bool:
    """Whether the progress event of `step` is stored: the first and last step's, and every
    stride-th, the stride spreading PROGRESS_EVENTS_KEPT over the job's steps."""
    stride = max(1, total_steps // PROGRESS_EVENTS_KEPT)
    return step in (1, total_steps) or step % stride == 0


def _state(job_id: str, time: float, state: str) -> training_pb2.JobEvent:
    return job_event(job_id, time, "state", {"state": state})


def _error(job_id: str, time: float, error: str) -> training_pb2.JobEvent:
    return job_event(job_id, time, "error", {"error": error})


def job_state_event(record: JobRecord) -> training_pb2.JobEvent:
    """The first event a watcher gets: the job as the registry has it now."""
    return _state(record.id, record.updated, record.state)
