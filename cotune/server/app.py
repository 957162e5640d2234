"""`cotune serve`: the runtime behind the gRPC services, the registry, health and reflection,
and a graceful stop on SIGTERM.

Start-up: the registry opens (sweeping what a crash left), a fresh data directory gets an
`admin` tenant whose first token goes to DATA_DIR/admin.token (mode 0600), the model loads,
unfinished jobs resume, and only then does health say SERVING (NOT_SERVING from the moment
it listens). From then on health says whether the engine can serve (`health.py`): it turns
NOT_SERVING once the engine stopped on an error, and while it is wedged.

Stop (SIGTERM or SIGINT): health turns NOT_SERVING and new calls get UNAVAILABLE; in-flight
calls get --grace-period seconds to finish; every job publishes a version at its next
optimizer step (waiting up to the grace period again), stays running in the registry, and
resumes from its newest version at the next start.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import NoReturn

import grpc

from cotune.adapters.registry import Quotas
from cotune.adapters.sql_registry import open_registry
from cotune.adapters.stores import open_stores
from cotune.distributed.ranks import RankInfo
from cotune.distributed.zero_config import check_sharding
from cotune.engine.engine import EngineConfig
from cotune.engine.runtime import Runtime, dtype_name
from cotune.server.adapter_service import AdapterService
from cotune.server.admission import Admission, OpenStreams
from cotune.server.file_service import FileService
from cotune.server.handlers import DecodeErrors, Gate
from cotune.server.health import NOT_SERVING, EngineHealth
from cotune.server.http.app import Tls, attach_front
from cotune.server.inference_service import InferenceService
from cotune.server.jobs import JobManager
from cotune.server.lifecycle import Lifecycle, start_metrics
from cotune.server.metrics import Metrics
from cotune.server.sessions import SessionManager
from cotune.server.tenant_service import TenantService
from cotune.server.training_service import TrainingService
from cotune.server.uploads import Staging
from cotune.server.usage_exchange import UsageExchange
from cotune.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

log = logging.getLogger("cotune.server")
SERVICES = tuple(f.DESCRIPTOR.services_by_name[name].full_name for f, name in (
    (adapters_pb2, "AdapterService"), (training_pb2, "TrainingService"),
    (inference_pb2, "InferenceService"), (tenants_pb2, "TenantService"),
    (files_pb2, "FileService")))
MAX_MESSAGE_BYTES = 64 << 20  # inline training data; larger sets go by server_path
UNARY_THREADS = 16  # rpc threads no stream can take: health checks and unary calls


class CotuneServer:
    def __init__(self, args):
        self.rank = RankInfo.from_env()  # None: the whole base in this process
        check_sharding(self.rank is not None, args.zero_offload, args.device)
        # bad bounds refused before loading
        open_streams = OpenStreams(args.max_open_streams, args.max_open_streams_per_tenant)
        data_dir: Path = args.data_dir
        if self.rank is not None:
            if args.registry or args.blobs:
                raise ValueError(
                    "--registry or --blobs (or $COTUNE_REGISTRY, $COTUNE_BLOBS) with a sharded "
                    "base is not supported yet: each rank keeps a registry of its own in "
                    "DATA_DIR/rank-N; accepted: neither with a sharded base")
            data_dir = data_dir / f"rank-{self.rank.rank}"
        data_dir.mkdir(parents=True, exist_ok=True)
        stores = open_stores(args.blobs, data_dir, args.blob_cache_mb * 2**20)
        self.registry = open_registry(args.registry, data_dir, Quotas(
            args.default_max_adapters, args.default_max_versions, args.default_max_jobs,
            args.default_max_queued, args.default_tokens_per_minute,
            args.default_max_sessions), stores)
        self.admin_token_file = data_dir / "admin.token"
        self._bootstrap_admin(args.admin_token_file)
        self.runtime = self._load_runtime(args)
        self.gate = Gate(self.registry, open_streams)
        self.metrics = Metrics(args.metrics_top_adapters)
        open_streams.on_refused = lambda tenant, protocol: \
            self.metrics.open_stream_refusals.labels(tenant, protocol).inc()
        self.metrics.watch(self.runtime)
        self.jobs = JobManager(self.runtime, self.registry, data_dir / "jobs", self.metrics,
                               args.worker_id, args.keep_training_states,
                               args.job_lease_seconds, stores.jobs)
        # a sharded base's ranks step in lockstep over their own requests: a session's
        # operations would reach one rank only, so sessions are refused there for now
        self.sessions = SessionManager(self.runtime, self.registry, data_dir / "sessions",
                                       args.session_idle_timeout, sharded=self.rank is not None)
        max_bytes = args.max_upload_mb << 20
        # a stream holds a thread while it runs: generations (bounded by admission), calls a
        # client may hold open (bounded by the gate), and a reserve for every other call
        workers = args.max_queued_requests + args.max_open_streams + UNARY_THREADS
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            maximum_concurrent_rpcs=workers,  # past it: RESOURCE_EXHAUSTED at once, no queue
            interceptors=[DecodeErrors()],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        staging = Staging(data_dir / "uploads", args.worker_id)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterService(
            self.gate, self.registry, staging, self.runtime.engine.adapters.base_modules,
            args.max_rank, args.allow_path, max_bytes, args.upload_idle_timeout), self.server)
        files_pb2_grpc.add_FileServiceServicer_to_server(FileService(
            self.gate, self.registry, staging, max_bytes, args.upload_idle_timeout,
            args.max_files_per_tenant), self.server)
        training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingService(
            self.gate, self.registry, self.jobs, args.allow_path, max_bytes, self.sessions),
            self.server)
        admission = Admission(args.max_queued_requests)
        self.usage = UsageExchange(self.registry, admission, args.worker_id)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceService(
            self.gate, self.registry, self.runtime, admission,
            _model_info(self.runtime, args), self.metrics, args.max_logprobs, self.sessions),
            self.server)
        tenants_pb2_grpc.add_TenantServiceServicer_to_server(
            TenantService(self.gate, self.registry, self.jobs, self.sessions), self.server)
        self.lifecycle = Lifecycle(SERVICES, args.grace_period, log)
        self.lifecycle.add_to(self.server)
        self.lifecycle.set_health(NOT_SERVING)  # until the jobs have resumed
        self.health = EngineHealth(self.runtime, self.lifecycle, args.health_stall_seconds, log)
        port = self._rank_port(args.port)
        self.port = self.server.add_secure_port(f"{args.host}:{port}", _credentials(args)) \
            if args.tls_cert else self.server.add_insecure_port(f"{args.host}:{port}")
        self.http = attach_front(self.server, args.host, self._rank_port(args.http_port),
                                 Tls(args.tls_cert, args.tls_key, args.tls_client_ca)
                                 if args.tls_cert else None, max_bytes)
        self.metrics_port = start_metrics(args.host, self._rank_port(args.metrics_port),
                                          self.metrics.registry)
        self.grace = args.grace_period
        self.exit_code = 0

    def _rank_port(self, port: int) -> int:
        """The ranks on one host listen on port + LOCAL_RANK (0 stays 0: any free port)."""
        return port + self.rank.local_rank if self.rank is not None and port else port

    def _load_runtime(self, args) -> Runtime:
        options = dict(max_rank=args.max_rank, num_slots=args.num_slots,
                       host_cache_mb=args.host_cache_mb, kv_cache_tokens=args.kv_cache_tokens,
                       ttft_target_s=args.ttft_target, tpot_target_s=args.tpot_target,
                       tenant_isolation=args.tenant_isolation,
                       num_threads=args.threads, time_slice_s=args.time_slice,
                       training_threads=self._training_threads(args))
        if self.rank is None:
            return Runtime.load(args.model, device=args.device, dtype=args.dtype,
                                quantize=args.quantize, **options)
        if args.quantize is not None:
            raise ValueError("--quantize applies to a base on one device; a base sharded over "
                             "ranks (ZeRO-3) is stored in --dtype; accepted: one or the other")
        from cotune.distributed.sharded_runtime import load_sharded_runtime  # imports deepspeed

        return load_sharded_runtime(args.model, self.rank, dtype=args.dtype or "float32",
                                    zero_offload=args.zero_offload,
                                    nvme_path=args.nvme_path, timeout_s=args.rank_timeout,
                                    **options)

    def _training_threads(self, args) -> int:
        """--training-threads, or by default the cores the serving steps leave idle (none
        for a sharded base, whose ranks step together, or a time-slicing baseline)."""
        if args.training_threads is not None:
            return args.training_threads
        if self.rank is not None or args.time_slice is not None:
            return 0
        return EngineConfig(num_threads=args.threads).idle_cores(args.device)

    def start(self) -> None:
        self.server.start()
        if self.http is not None:
            self.http.start()
        self.jobs.resume_unfinished()
        self.sessions.start()
        self.health.update()  # SERVING, unless the engine failed meanwhile
        threading.Thread(target=self._watch_engine, daemon=True, name="engine-watch").start()

    def _watch_engine(self) -> None:
        """An engine that stopped on an error, or is wedged, serves nothing: health says
        NOT_SERVING, so that the orchestrator takes this replica out of rotation and restarts
        it. A rank of a sharded base whose engine stopped exits."""
        while not self.lifecycle.stopping.wait(self.health.poll_s):
            if self.rank is not None and not self.runtime.running:
                self._leave_ranks()
                return
            self.health.update()

    def _leave_ranks(self) -> None:
        """The ranks of a sharded base stop as one: when another rank stopped or died (or this
        one's collectives timed out), this rank cannot step alone, so it exits."""
        reason = "another rank stopped" if self.runtime.error is None else \
            f"lost the other ranks: {self.runtime.error!r}"
        log.error("rank %d of %d: the sharded base stopped (%s); exiting", self.rank.rank,
                  self.rank.world_size, reason, exc_info=self.runtime.error)
        self.exit_code = 1
        threading.Thread(target=self.stop, name="stop").start()

    def stop(self) -> None:
        """Drains and stops within the grace period and one step; safe to call from a signal
        handler's thread. Running jobs publish a version at their next optimizer step while
        the calls in flight drain, so that the next start resumes them losing nothing."""
        self.gate.draining = True  # new calls: UNAVAILABLE
        if self.http is not None:
            self.http.drain()  # new HTTP calls: 503, saying why
        started = time.monotonic()
        if not self.lifecycle.drain(self.server,
                                    meanwhile=lambda: self.runtime.checkpoint_jobs(self.grace)):
            return
        log.info("stopping: calls drained and jobs checkpointed after %.1f s",
                 time.monotonic() - started)
        if self.http is not None:
            self.http.stop()
        self.jobs.stop()
        self.sessions.stop()  # their live weights go with the engine
        self.runtime.close()  # at the end of the step in progress
        log.info("stopping: engine stopped after %.1f s", time.monotonic() - started)
        self.jobs.join(self.grace)  # the jobs' last events, written to the registry
        log.info("stopped after %.1f s", time.monotonic() - started)
        self.usage.stop()
        self.registry.close()
        self.lifecycle.stopped.set()

    def _bootstrap_admin(self, preset: Path | None) -> None:
        token = self.registry.bootstrap_admin(
            None if preset is None else preset.read_text().strip())
        if token is None or preset is not None:
            return  # the registry had its admin, or the operator has the token already
        fd = os.open(self.admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")


def _credentials(args) -> grpc.ServerCredentials:
    if args.tls_key is None:
        raise ValueError("--tls-cert needs --tls-key")
    client_ca = args.tls_client_ca.read_bytes() if args.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(args.tls_key.read_bytes(), args.tls_cert.read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def _model_info(runtime: Runtime, args) -> inference_pb2.ModelInfo:
    config = runtime.engine.model.config
    return inference_pb2.ModelInfo(
        name=str(args.model) if args.model == "default" else Path(args.model).name,
        base_fingerprint=runtime.base_fingerprint, vocab_size=config.vocab_size,
        max_context=config.max_position_embeddings, max_rank=args.max_rank,
        lora_targets=sorted({name.rsplit(".", 1)[-1]
                             for name in runtime.engine.adapters.base_modules}),
        dtype=dtype_name(runtime.engine.model.dtype), device=args.device,
        hidden_size=config.hidden_size, num_layers=config.num_layers,
        quantization=args.quantize or "")


def serve_command(args) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = CotuneServer(args)
    server.start()
    # What start-up built (the model, the tokenizer, the stubs) lives as long as the process:
    # out of the cyclic GC, a full collection no longer stalls the engine's step (0.18 s for
    # the default model on a 2-core CPU).
    gc.freeze()
    scheme = "grpcs" if args.tls_cert else "grpc"
    banner = [f"cotune serve: listening on {args.host}:{server.port} ({scheme})"]
    if server.http is not None:
        banner.append(f"openai api: {server.http.url}")
    if server.metrics_port:
        banner.append(f"metrics: http://{args.host}:{server.metrics_port}/metrics")
    config = server.runtime.engine.config
    banner.append(f"threads: {config.torch_threads} serving, " + (
        f"{config.training_threads} on a training lane" if config.training_threads
        else "jobs train in the serving steps"))
    if args.admin_token_file is not None:
        banner.append(f"admin token: the one in {args.admin_token_file}")
    elif server.admin_token_file.exists():
        banner.append(f"admin token (from {server.admin_token_file}): "
                      f"{server.admin_token_file.read_text().strip()}\n"
                      f"try: COTUNE_ADDR={args.host}:{server.port} COTUNE_TOKEN=<the token> "
                      "cotune adapters list")
    server.lifecycle.run_until_stopped(server.stop, banner)
    # Stopped with everything on disk (calls drained, jobs checkpointed, the registry
    # closed): the interpreter's teardown of the model and of every module would only delay
    # the exit past the grace period and one step (0.4-1.2 s here), so it is skipped.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(server.exit_code)
