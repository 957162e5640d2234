"""The options of `cotune serve`, and the network ones that `cotune route` shares. Torch-free:
the CLI builds its parser without loading the engine, and the router imports them."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from cotune.model.quantization import QUANTIZATIONS


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds above 0, such as 0.25")
    return seconds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0, such as 2")
    return value


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more, such "
                                         "as 1")
    return value


def isolation_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value == 0 or 1 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 or a factor of 1 or more, such "
                                         "as 1.5")
    return value


def default_data_dir() -> Path:
    return Path(os.environ.get("COTUNE_DATA_DIR", Path.home() / ".local/share/cotune"))


def add_network_arguments(parser: argparse.ArgumentParser,
                          port: int) -> argparse._ArgumentGroup:
    """The "network" group with what every gRPC server of cotune listens on (`port` is the
    default --port); the caller adds its own options to the group it returns."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 0.0.0.0 for every interface")
    net.add_argument("--port", type=int, default=port, help="gRPC port; 0 picks a free one")
    net.add_argument("--metrics-port", type=int, default=0,
                     help="serve Prometheus metrics on this port (/metrics); 0: none")
    net.add_argument("--http-port", type=int, default=None, metavar="PORT",
                     help="also serve the OpenAI-compatible HTTP API (/v1/...) and an open "
                          "/health on this port, beside gRPC in the same process and with "
                          "the same tokens; 0 picks a free one [none]")
    return net


def add_grace_period_argument(group: argparse._ArgumentGroup, default: float) -> None:
    group.add_argument("--grace-period", type=float, default=default,
                       help="seconds in-flight calls get to finish after SIGTERM")


def add_base_storage_arguments(group) -> None:
    """--dtype and --quantize, of `cotune serve` and of the commands that run a model
    in-process."""
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                       help="dtype of the base's weights and activations [float32; bfloat16 "
                            "with --quantize]")
    group.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                       help="store the base's decoder projections in 8 or 4 bits (weight-only; "
                            "adapters stay in --dtype) [none]")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="default",
                       help="'default' (SmolLM2-135M-Instruct), a checkpoint dir or a .gguf")
    add_base_storage_arguments(model)
    model.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    model.add_argument("--max-rank", type=int, default=64,
                       help="largest LoRA rank the slot pool holds")
    model.add_argument("--num-slots", type=int, default=16,
                       help="adapters resident on the device at once")
    model.add_argument("--host-cache-mb", type=int, default=1024,
                       help="parsed adapters kept in host memory (pinned on a GPU) between the "
                            "store on disk and the device slots")
    model.add_argument("--kv-cache-tokens", type=int, default=16384,
                       help="tokens the paged KV cache holds, every sequence together")
    model.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="torch threads for the engine's steps [half the cores]")
    slo = parser.add_argument_group(
        "serving targets: each step is sized to keep them, and training gets the time left")
    slo.add_argument("--ttft-target", type=positive_seconds, default=2.0, metavar="SECONDS",
                     help="time to first token a request should see")
    slo.add_argument("--tpot-target", type=positive_seconds, default=0.25, metavar="SECONDS",
                     help="time per output token a decoding request should see")
    slo.add_argument("--tenant-isolation", type=isolation_factor, default=0.0,
                     metavar="FACTOR",
                     help="while one tenant floods, the longest step beside another tenant's "
                          "few requests, as a multiple of the step those would take alone "
                          "(the flood's own tokens slow down instead, by much where a step's "
                          "fixed cost is high, as on a CPU), such as 1.5; 0: no bound, only "
                          "fair shares of what the TPOT target allows [0]")
    slo.add_argument("--training-threads", type=whole_number, default=None, metavar="N",
                     help="torch threads of a training lane: jobs train on a thread of their "
                     "own beside the serving steps, on the cores those leave idle; 0: jobs "
                     "train in the serving steps, in the room the targets leave [on a CPU, "
                     "the cores --threads leaves; on a GPU, under torchrun or with "
                     "--time-slice, 0]")
    slo.add_argument("--time-slice", type=positive_seconds, default=None, metavar="SECONDS",
                     help="the baseline co-serving is measured against: alternate phases of "
                     "SECONDS, serving only then training only [off: co-serving]")
    sharded = parser.add_argument_group(
        "sharded base: under torchrun (or with WORLD_SIZE > 1 and RANK, LOCAL_RANK, MASTER_ADDR, "
        "MASTER_PORT set) the ranks partition the base with DeepSpeed ZeRO-3; each rank serves "
        "on --port + LOCAL_RANK with DATA_DIR/rank-RANK")
    sharded.add_argument("--zero-offload", default="none", choices=["none", "cpu", "nvme"],
                         help="keep the base's partitions in CPU memory or on NVMe between uses")
    sharded.add_argument("--nvme-path", type=Path,
                         help="with --zero-offload nvme: a directory on the NVMe drive")
    sharded.add_argument("--rank-timeout", type=float, default=120.0,
                         help="seconds a rank waits for the others in a collective; past it "
                              "(a rank died) this rank exits")

    net = add_network_arguments(parser, port=50051)
    net.add_argument("--metrics-top-adapters", type=int, default=20,
                     help="adapters of a tenant named in metric labels (the busiest; the rest "
                          "are 'other')")
    net.add_argument("--health-stall-seconds", type=positive_seconds, default=60.0,
                     metavar="SECONDS",
                     help="grpc.health.v1 says NOT_SERVING while the engine is wedged: work "
                          "waits and no step has completed for this long; SERVING again once "
                          "it steps (it says NOT_SERVING for good once the engine stopped on "
                          "an error)")
    net.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    net.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    net.add_argument("--tls-client-ca", type=Path,
                     help="PEM CA bundle: require client certificates signed by it (mTLS)")

    store = parser.add_argument_group("storage")
    store.add_argument("--data-dir", type=Path, default=default_data_dir(),
                       help="registry, adapter versions, jobs (default $COTUNE_DATA_DIR or "
                            "~/.local/share/cotune)")
    store.add_argument("--registry", default=os.environ.get("COTUNE_REGISTRY", ""), metavar="URL",
                       help="the registry's database: a postgresql:// URL, one database for "
                            "every worker of a cluster (its password from $PGPASSWORD or "
                            "$PGPASSFILE rather than the URL); default $COTUNE_REGISTRY, or "
                            "when unset, the embedded SQLite in --data-dir")
    store.add_argument("--blobs", default=os.environ.get("COTUNE_BLOBS", ""), metavar="URL",
                       help="where adapter versions and uploaded files are kept: an "
                            "s3://bucket/prefix URL of any S3-compatible store, shared by every "
                            "worker of a cluster (endpoint and credentials from the environment "
                            "as boto3 reads them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); "
                            "default $COTUNE_BLOBS, or when unset, directories in --data-dir")
    store.add_argument("--blob-cache-mb", type=positive_int, default=10240, metavar="MB",
                       help="with --blobs s3://...: the local disk cache of files from the "
                            "store, in --data-dir; least recently used files go past it")
    store.add_argument("--admin-token-file", type=Path,
                       help="at the first start, the admin tenant's token is the one in this "
                            "file (a Kubernetes Secret) instead of a new one in "
                            "DATA_DIR/admin.token")
    store.add_argument("--allow-path", type=Path, action="append", default=[],
                       help="a server directory whose adapters and data files admin tokens may "
                            "name by path (repeatable); none by default")
    store.add_argument("--worker-id", default=socket.gethostname(),
                       help="this worker's name among those sharing --data-dir behind a router: "
                            "it owns the jobs it runs and resumes only those (default: the "
                            "hostname, the pod's name in a StatefulSet)")
    store.add_argument("--keep-training-states", type=positive_int, default=2, metavar="N",
                       help="training states (optimizer moments, ~2x the adapter's size) a job "
                            "keeps on disk, its newest; older ones go once their versions are "
                            "published (a job resumes from its newest)")
    store.add_argument("--job-lease-seconds", type=positive_seconds, default=30.0,
                       metavar="S",
                       help="a job's owner renews its hold on the job every third of this; a "
                            "worker of the same registry takes over the jobs of one that "
                            "stopped renewing this long ago (dead, or cut off from the "
                            "registry), and resumes each from its newest checkpoint")
    store.add_argument("--max-upload-mb", type=int, default=2048,
                       help="largest adapter upload or training data file")
    store.add_argument("--max-files-per-tenant", type=whole_number, default=100, metavar="N",
                       help="uploaded files (FileService, /v1/files) a tenant may keep at once; "
                            "0: no limit")

    limits = parser.add_argument_group("admission and default quotas (0: no limit)")
    limits.add_argument("--max-queued-requests", type=int, default=256,
                        help="generations in flight on this server, every tenant together")
    limits.add_argument("--max-open-streams", type=int, default=16,
                        help="adapter uploads, exports and job watches open at once (at least "
                             "2): past it they are refused, so that other calls and health "
                             "checks always find a thread. The last place is kept for admins: "
                             "other tenants together fill at most one less")
    limits.add_argument("--max-open-streams-per-tenant", type=int, default=None, metavar="N",
                        help="of --max-open-streams, those one tenant may hold at once, so "
                             "that one tenant cannot shut out the others (1 to "
                             "--max-open-streams) [a quarter of --max-open-streams, at least 1]")
    limits.add_argument("--upload-idle-timeout", type=positive_seconds, default=30.0,
                        metavar="SECONDS",
                        help="an adapter upload whose next message (a file chunk: 1 MiB from "
                             "the SDK) does not arrive within this long ends with "
                             "DEADLINE_EXCEEDED, nothing of it kept, and frees its place")
    limits.add_argument("--max-logprobs", type=whole_number, default=20, metavar="K",
                        help="alternatives a generation may ask for per token (logprobs): "
                             "each one is computed, sorted and sent for every token, in the "
                             "steps that other tenants' requests share")
    limits.add_argument("--default-max-adapters", type=int, default=1000,
                        help="adapters of a tenant")
    limits.add_argument("--default-max-versions", type=int, default=1000,
                        help="versions per adapter")
    limits.add_argument("--default-max-jobs", type=int, default=4, help="concurrent jobs")
    limits.add_argument("--default-max-queued", type=int, default=64,
                        help="a tenant's generations in flight")
    limits.add_argument("--default-tokens-per-minute", type=int, default=0,
                        help="a tenant's prompt and generated tokens a minute")
    limits.add_argument("--default-max-sessions", type=int, default=4,
                        help="a tenant's RL sessions open at once on this server")
    limits.add_argument("--session-idle-timeout", type=positive_seconds, default=600.0,
                        metavar="SECONDS",
                        help="an RL session with no call for this long is closed (its live "
                             "weights and optimizer state dropped) and frees its place in the "
                             "tenant's max_sessions")
    add_grace_period_argument(limits, 30.0)
