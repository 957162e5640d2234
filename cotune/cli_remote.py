"""The `cotune` commands that talk to a server through the SDK: adapters, files, finetune,
jobs, tenants and `generate --addr`. None of them imports torch.

Each command prints a table or lines for people, or with --json one JSON document (a stream:
one JSON line per event). `cli.main` turns a CotuneError into `cotune: error: CODE: message`.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from cotune.cli_output import ProgressLine, print_fields, print_json, print_table, when
from cotune.client import Client
from cotune.client.types import JOB_STATES, TERMINAL_JOB_STATES

_FINETUNE_SETTINGS = ("rank", "alpha", "target_modules", "dropout", "lr", "weight_decay",
                      "max_grad_norm", "schedule", "warmup_steps", "epochs", "max_steps",
                      "batch_size", "grad_accumulation", "max_length", "checkpoint_every",
                      "eval_fraction", "seed", "min_share")
_QUOTA_FLAGS = {  # flag: (Quotas field, what it limits)
    "--max-adapters": ("max_adapters", "adapters of the tenant"),
    "--max-versions": ("max_versions_per_adapter", "versions per adapter"),
    "--max-jobs": ("max_concurrent_jobs", "concurrent jobs"),
    "--max-queued": ("max_queued_requests", "generations in flight"),
    "--max-tokens-per-minute": ("max_tokens_per_minute", "prompt and generated tokens a minute"),
    "--max-sessions": ("max_sessions", "RL sessions open at once on a server"),
}


def add_commands(commands) -> None:
    """Adds adapters, files, finetune, jobs and tenants to the `cotune` subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--addr", help="server host:port (default $COTUNE_ADDR, else "
                                       "127.0.0.1:50051)")
    common.add_argument("--token", help="bearer token (default $COTUNE_TOKEN)")
    common.add_argument("--json", action="store_true",
                        help="JSON for scripts (streams: one JSON line per event)")

    def command(group, name: str, handler, summary: str):
        parser = group.add_parser(name, parents=[common], help=summary)
        parser.set_defaults(run=partial(_with_client, handler))
        return parser

    adapters = commands.add_parser("adapters", help="the tenant's adapters on a server")
    group = adapters.add_subparsers(dest="action", required=True)
    p = command(group, "list", _adapters_list, "list adapters")
    p.add_argument("--prefix", default="", help="only names that start with this")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                   help="only adapters with this label (repeatable)")
    command(group, "show", _adapters_show, "an adapter").add_argument("name")
    command(group, "versions", _adapters_versions, "an adapter's versions").add_argument("name")
    p = command(group, "import", _adapters_import, "upload a PEFT directory as a new version")
    p.add_argument("name")
    p.add_argument("dir")
    p.add_argument("--description", default="", help="what the adapter is for")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                   help="a label of the adapter (repeatable)")
    p = command(group, "merge", _adapters_merge, "a new version merging weighted versions "
                "(PEFT's add_weighted_adapter)")
    p.add_argument("name", help="the adapter the merge becomes the next version of (new, or "
                                "one of yours)")
    p.add_argument("--from", dest="parents", type=_parent, action="append", required=True,
                   metavar="NAME@vK:WEIGHT", help="a version to merge and its weight (1 when "
                   "left out; negative subtracts); repeatable, 1 to 16")
    p.add_argument("--method", required=True, help="linear, cat, svd, ties, ties_svd, "
                   "dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune or "
                   "magnitude_prune_svd")
    p.add_argument("--density", type=float, help="share of entries kept, in (0, 1]: for the "
                   "methods that prune (all but linear, cat and svd)")
    p.add_argument("--majority-sign-method", choices=["total", "frequency"],
                   help="how the ties methods elect each entry's sign (default total)")
    p.add_argument("--svd-rank", type=int, help="rank of the svd methods' result (default: "
                   "the largest parent rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dare methods' random "
                   "masks (default 0)")
    p.add_argument("--description", default="", help="what the adapter is for")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                   help="a label of the adapter (repeatable)")
    p = command(group, "export", _adapters_export, "download a version into a new directory")
    p.add_argument("name", help="name (the newest version) or name@vK")
    p.add_argument("dest")
    p = command(group, "delete", _adapters_delete, "delete an adapter (or name@vK, one version)")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    files = commands.add_parser("files", help="the tenant's uploaded files (training data)")
    group = files.add_subparsers(dest="action", required=True)
    p = command(group, "upload", _files_upload, "upload a JSONL file for fine-tuning jobs")
    p.add_argument("path")
    p.add_argument("--purpose", default="fine-tune", help="what the file is for [fine-tune]")
    command(group, "list", _files_list, "list files").add_argument(
        "--purpose", default="", help="only files of this purpose")
    command(group, "show", _files_show, "a file").add_argument("id")
    p = command(group, "download", _files_download, "a file's bytes into a new file")
    p.add_argument("id")
    p.add_argument("dest")
    p = command(group, "delete", _files_delete, "delete a file (jobs made from it go on)")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = command(commands, "finetune", _finetune, "fine-tune an adapter on a server, and watch")
    p.add_argument("name", help="the adapter to train: new, or existing: its next versions "
                                "continue from its newest, with its weights and settings (those "
                                "given here change them, but for its rank and targets)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="JSONL: prompt/completion, messages or text")
    data.add_argument("--training-file", metavar="ID",
                      help="one of the tenant's files (cotune files upload) instead of --data")
    p.add_argument("--from-scratch", action="store_true",
                   help="an existing adapter's next versions start from new weights, at the "
                        "settings given here")
    add_finetune_options(p)
    p.add_argument("--detach", action="store_true", help="start the job and return")

    jobs = commands.add_parser("jobs", help="the tenant's fine-tuning jobs")
    group = jobs.add_subparsers(dest="action", required=True)
    p = command(group, "list", _jobs_list, "list jobs")
    p.add_argument("--state", choices=list(JOB_STATES.values()),
                   help="only jobs in this state")
    p.add_argument("--all-tenants", action="store_true",
                   help="every tenant's jobs (admin token)")
    command(group, "show", _jobs_show, "a job").add_argument("id")
    command(group, "watch", _jobs_watch, "follow a job until it ends").add_argument("id")
    p = command(group, "cancel", _jobs_cancel, "stop a job after its current step")
    p.add_argument("id")
    p.add_argument("--all-tenants", action="store_true",
                   help="the job may be any tenant's (admin token)")

    tenants = commands.add_parser("tenants", help="tenants, quotas and tokens (admin token)")
    group = tenants.add_subparsers(dest="action", required=True)
    p = command(group, "create", _tenants_create, "a new tenant")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may manage tenants")
    _quota_options(p)
    command(group, "show", _tenants_show, "a tenant, its quotas and tokens").add_argument("name")
    command(group, "list", _tenants_list, "list tenants")
    p = command(group, "delete", _tenants_delete, "delete a tenant with its tokens, adapters "
                "and jobs (running ones are cancelled)")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = command(group, "quotas", _tenants_quotas, "change some quotas of a tenant")
    p.add_argument("name")
    _quota_options(p)
    token = group.add_parser("token", help="issue or revoke a tenant's tokens")
    token_group = token.add_subparsers(dest="token_action", required=True)
    p = command(token_group, "issue", _token_issue, "a new token (its secret is shown once)")
    p.add_argument("tenant")
    p.add_argument("--description", default="", help="what the token is for")
    command(token_group, "revoke", _token_revoke, "revoke a token by id").add_argument("id")


def add_generate_options(parser) -> None:
    """The options `cotune generate` needs to run on a server instead of in-process."""
    parser.add_argument("--addr", "--server", nargs="?", const="", metavar="ADDR",
                        help="generate on the cotune server at ADDR, host:port (--addr alone: "
                             "$COTUNE_ADDR, else 127.0.0.1:50051); --adapter is then an "
                             "adapter name. --server is an older spelling of --addr")
    parser.add_argument("--token", help="with --addr: bearer token (default $COTUNE_TOKEN)")
    parser.add_argument("--json", action="store_true",
                        help="with --addr: one JSON line per streamed delta")


def add_finetune_options(parser) -> None:
    """The settings of a fine-tuning job, each named as Jobs.create takes it. Those not given
    take the server's defaults (training.proto), shown here."""
    lora = parser.add_argument_group("the adapter")
    lora.add_argument("--rank", type=int, help="LoRA rank, 1 to 1024 (default 16)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha: the update is scaled by "
                                                  "alpha/rank (default 32)")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    lora.add_argument("--dora", action="store_true",
                      help="DoRA: a learned magnitude per output (PEFT's use_dora)")
    lora.add_argument("--targets", dest="target_modules", type=lambda s: s.split(","),
                      help="modules to adapt, e.g. q_proj,v_proj (default "
                           "q_proj,k_proj,v_proj,o_proj)")
    lora.add_argument("--dropout", type=float, help="LoRA dropout, in [0, 1) (default 0)")
    optimizer = parser.add_argument_group("the optimizer (AdamW) and its schedule")
    optimizer.add_argument("--lr", type=float, help="peak learning rate, in (0, 1] "
                                                    "(default 2e-4)")
    optimizer.add_argument("--weight-decay", type=float, help="in [0, 1] (default 0)")
    optimizer.add_argument("--max-grad-norm", type=float,
                           help="clip the gradient's norm to this; 0: no clipping (default 1)")
    optimizer.add_argument("--schedule", help="decay of the learning rate after the warmup: "
                                              "constant, linear or cosine (default cosine)")
    optimizer.add_argument("--warmup", dest="warmup_steps", type=int, metavar="STEPS",
                           help="optimizer steps of linear warmup (default 0)")
    run = parser.add_argument_group("the run")
    run.add_argument("--epochs", type=int, help="passes over the data, 1 to 10000 (default 1)")
    run.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    run.add_argument("--batch-size", type=int, help="examples per micro-batch, 1 to 4096 "
                                                    "(default 4)")
    run.add_argument("--grad-accumulation", type=int, metavar="N",
                     help="micro-batches per optimizer step, 1 to 4096 (default 1)")
    run.add_argument("--max-length", type=int, metavar="TOKENS",
                     help="tokens per example; longer ones are cut (default 1024)")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                     help="steps between published versions (default 0: only the final one)")
    run.add_argument("--eval-fraction", type=float,
                     help="share of the examples held out for evaluation, in [0, 1) "
                          "(default 0)")
    run.add_argument("--seed", type=int, help="seed of the initialisation, the order of the "
                                              "examples and the dropout (default 0)")
    run.add_argument("--min-share", type=float, help="share of step time the job keeps however "
                     "busy serving is, in [0, 1) (default 0: only the room the SLOs leave)")


def finetune_settings(args) -> dict:
    """The job's settings given on the command line, as Jobs.create takes them."""
    settings = {name: getattr(args, name) for name in _FINETUNE_SETTINGS
                if getattr(args, name) is not None}
    settings["rslora"] = args.rslora
    settings["dora"] = args.dora
    settings["from_scratch"] = args.from_scratch
    return settings


def generate_on_server(args, sampling: dict) -> int:
    """Streams the completion of `args.prompt` to stdout as it arrives."""
    address, prompt = args.addr, args.prompt
    if prompt is None:  # `generate --addr PROMPT`: argparse gave the prompt to --addr
        address, prompt = "", address
    if args.requests is not None or not prompt:
        raise ValueError("with --addr give one prompt (--requests runs in-process)")
    with Client(address or None, _token(args.token)) as client:
        for delta in client.generate(prompt, adapter=args.adapter, **sampling):
            if args.json:
                print_json(delta)
            else:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
    if not args.json:
        print()
    return 0


def _emit(args, value, human) -> int:
    """Prints `value` as one JSON document with --json; else `human`, a text or a function
    that prints it. Returns the exit status, 0."""
    if args.json:
        print_json(value)
    elif callable(human):
        human()
    else:
        print(human)
    return 0


def _with_client(handler, args) -> int:
    with Client(args.addr, _token(args.token)) as client:
        return handler(args, client)


def _token(given: str | None) -> str:
    """--token, else $COTUNE_TOKEN: every command here needs one."""
    token = os.environ.get("COTUNE_TOKEN") if given is None else given
    if not token:
        raise ValueError("no token: pass --token TOKEN or set COTUNE_TOKEN; an admin issues "
                         "tokens with `cotune tenants token issue TENANT`")
    return token


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not a label; write key=value")
    return key, value


def _parent(text: str) -> tuple[str, float]:
    """NAME@vK:WEIGHT (or NAME@vK, of weight 1) of `adapters merge --from`."""
    adapter, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return adapter, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a weighted version; write NAME@vK:WEIGHT, e.g. a@v2:0.7") from None


def _quota_options(parser) -> None:
    for flag, (field, limits) in _QUOTA_FLAGS.items():
        parser.add_argument(flag, dest=field, type=int, help=f"{limits} (0: no limit)")


def _quota_limits(args) -> dict[str, int]:
    """The quotas given on the command line."""
    return {field: getattr(args, field) for field, _ in _QUOTA_FLAGS.values()
            if getattr(args, field) is not None}


def _adapters_list(args, client) -> int:
    adapters = list(client.adapters.list(name_prefix=args.prefix, labels=dict(args.label)))
    return _emit(args, adapters, lambda: print_table(
        ["name", "latest", "versions", "description", "labels", "updated"],
        [[a.name, f"v{a.latest_version}", a.version_count, a.description, a.labels,
          when(a.update_time)] for a in adapters]))


def _adapters_show(args, client) -> int:
    adapter = client.adapters.get(args.name)
    return _emit(args, adapter, lambda: print_fields(adapter))


def _adapters_versions(args, client) -> int:
    versions = list(client.adapters.versions(args.name))
    return _emit(args, versions, lambda: print_table(
        ["version", "rank", "alpha", "targets", "bytes", "sha256", "source", "parent", "job",
         "dataset", "settings", "metrics", "created"],
        [[v.ref, v.rank, v.alpha, v.target_modules, v.size_bytes, v.sha256[:12],
          v.provenance["source"], _parents(v.provenance), v.provenance["job_id"],
          v.provenance["dataset_fingerprint"][:12], _flat(v.provenance["hyperparameters"]),
          dict(sorted(v.provenance["metrics"].items())), when(v.create_time)]
         for v in versions]))


def _parents(provenance: dict):
    """The parent version, or a merge's weighted parents."""
    if provenance["parents"]:
        return ", ".join(f"{p['adapter']} x {p['weight']:g}" for p in provenance["parents"])
    return provenance["parent_version"]


def _flat(settings: dict) -> dict:
    """A job's settings with its nested groups (lora, optimizer) spread out, by name, for a
    table."""
    flat = {}
    for key, value in settings.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return dict(sorted(flat.items()))


def _adapters_import(args, client) -> int:
    version = client.adapters.create(args.name, args.dir, description=args.description,
                                     labels=dict(args.label))
    return _emit(args, version,
                 f"published {version.ref} (rank {version.rank}, {version.size_bytes} bytes)")


def _adapters_merge(args, client) -> int:
    version = client.adapters.merge(
        args.name, args.parents, method=args.method, density=args.density,
        majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
        seed=args.seed, description=args.description, labels=dict(args.label))
    settings = version.provenance["hyperparameters"]
    return _emit(args, version,
                 f"published {version.ref} (rank {version.rank}, {settings['method']} of "
                 + ", ".join(f"{p['adapter']} x {p['weight']:g}"
                             for p in version.provenance["parents"]) + ")")


def _adapters_export(args, client) -> int:
    path = client.adapters.export(args.name, args.dest)
    return _emit(args, {"path": str(path)}, path)


def _confirmed(args, what: str) -> bool:
    """Whether to delete `what`: --yes, or the user's answer at a terminal."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(f"deleting {what} needs --yes when stdin is not a terminal")
    sys.stderr.write(f"delete {what}? [y/N] ")
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return True
    print("nothing deleted", file=sys.stderr)
    return False


def _adapters_delete(args, client) -> int:
    if not _confirmed(args, args.name + ('' if '@' in args.name else ' and every version')):
        return 1
    deleted = client.adapters.delete(args.name)
    return _emit(args, {"versions_deleted": deleted},
                 f"deleted {deleted} version{'s' * (deleted != 1)} of {args.name}")


def _files_upload(args, client) -> int:
    file = client.files.upload(args.path, purpose=args.purpose)
    return _emit(args, file, f"uploaded {file.id} ({file.filename}, {file.size_bytes} bytes)")


def _files_list(args, client) -> int:
    files = list(client.files.list(purpose=args.purpose))
    return _emit(args, files, lambda: print_table(
        ["id", "filename", "purpose", "bytes", "created"],
        [[f.id, f.filename, f.purpose, f.size_bytes, when(f.create_time)] for f in files]))


def _files_show(args, client) -> int:
    file = client.files.get(args.id)
    return _emit(args, file, lambda: print_fields(file))


def _files_download(args, client) -> int:
    dest = Path(args.dest)
    if dest.exists():
        raise ValueError(f"{dest} exists; accepted: a path that does not exist yet")
    data = client.files.content(args.id)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.write_bytes(data)
    partial.rename(dest)  # whole or not at all
    return _emit(args, {"path": str(dest), "size_bytes": len(data)},
                 f"wrote {len(data)} bytes to {dest}")


def _files_delete(args, client) -> int:
    if not _confirmed(args, args.id):
        return 1
    client.files.delete(args.id)
    return _emit(args, {"deleted": args.id}, f"deleted {args.id}")


def _finetune(args, client) -> int:
    job = client.jobs.create(args.name, args.data, training_file=args.training_file,
                             **finetune_settings(args))
    _emit(args, job, f"job {job.id}: {_what_it_trains(job)}")
    if args.detach:
        if not args.json:
            print(f"follow it with: cotune jobs watch {job.id}")
        return 0
    return _watch(client, job.id, args.json)


def _what_it_trains(job) -> str:
    parent = job.hyperparameters.get("parent_version")
    if parent is None:
        return f"training {job.adapter} from new weights"
    lora = job.hyperparameters["lora"]
    return (f"continuing {job.adapter}@v{parent:.0f} from its weights, at rank {lora['rank']:.0f} "
            f"with its settings and those given (--from-scratch starts from new weights)")


def _jobs_list(args, client) -> int:
    jobs = list(client.jobs.list(state=args.state, all_tenants=args.all_tenants))
    tenant = ["tenant"] if args.all_tenants else []
    return _emit(args, jobs, lambda: print_table(
        [*tenant, "id", "adapter", "state", "step", "loss", "versions", "created"],
        [[*([j.tenant] if tenant else []), j.id, j.adapter, j.state, f"{j.step}/{j.total_steps}",
          j.loss, j.versions, when(j.create_time)] for j in jobs]))


def _jobs_show(args, client) -> int:
    job = client.jobs.get(args.id)
    return _emit(args, job, lambda: print_fields(job))


def _jobs_watch(args, client) -> int:
    return _watch(client, args.id, args.json)


def _jobs_cancel(args, client) -> int:
    job = client.jobs.cancel(args.id, all_tenants=args.all_tenants)
    return _emit(args, job, f"job {job.id}: {job.state}"
                            f"{'' if job.done else ', stops after its current step'}")


def _watch(client, job_id: str, as_json: bool) -> int:
    """Follows a job until it ends: 0 when it succeeded, 1 when it failed or was cancelled.
    Ctrl-C stops the watching only; the job runs on."""
    progress = ProgressLine()
    try:
        for event in client.jobs.watch(job_id):
            if as_json:
                print_json(event)
            elif event.kind == "progress":
                progress.update(event.step, event.total_steps, event.loss,
                                event.tokens_per_second)
            else:
                progress.clear()
                _print_event(event)
            if event.kind == "state" and event.state in TERMINAL_JOB_STATES:
                break
    except KeyboardInterrupt:
        progress.clear()
        print(f"\nstopped watching; job {job_id} keeps running. Re-attach with: "
              f"cotune jobs watch {job_id}", file=sys.stderr)
        return 130
    progress.clear()
    job = client.jobs.get(job_id)
    if not as_json and job.state == "succeeded":
        print(f"succeeded: {', '.join(job.versions) or 'no version'} published")
    elif not as_json:
        print(job.state + (f": {job.error}" if job.error else ""), file=sys.stderr)
    return 0 if job.state == "succeeded" else 1


def _print_event(event) -> None:
    if event.kind == "state":
        print(f"job {event.job_id}: {event.state}")
    elif event.kind == "evaluation":
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(event.metrics.items()))
        print(f"evaluation at step {event.step}: {metrics}")
    elif event.kind == "checkpoint":
        print(f"checkpoint at step {event.step}: {event.version}")
    else:
        print(f"job error: {event.error}", file=sys.stderr)


def _tenants_create(args, client) -> int:
    limits = _quota_limits(args)
    tenant = client.tenants.create(args.name, admin=args.admin, **limits)  # the rest: defaults
    return _emit(args, tenant, f"created tenant {tenant.name}")


def _tenants_show(args, client) -> int:
    tenant = client.tenants.get(args.name)
    if args.json:
        print_json(tenant)
        return 0
    print_fields(tenant, exclude=("tokens",))
    print()
    print_table(["token id", "description", "created", "revoked"],
                [[t.id, t.description, when(t.create_time), t.revoked] for t in tenant.tokens])
    return 0


def _tenants_list(args, client) -> int:
    tenants = list(client.tenants.list())
    return _emit(args, tenants, lambda: print_table(
        ["name", "admin", "quotas", "tokens", "created"],
        [[t.name, t.admin, t.quotas, sum(not k.revoked for k in t.tokens),
          when(t.create_time)] for t in tenants]))


def _tenants_delete(args, client) -> int:
    if not _confirmed(args, f"tenant {args.name} with its tokens, adapters and jobs"):
        return 1
    deleted = client.tenants.delete(args.name)
    return _emit(args, deleted, f"deleted tenant {args.name}: {deleted.adapters_deleted} "
                                f"adapters ({deleted.versions_deleted} versions), "
                                f"{deleted.jobs_deleted} jobs ({deleted.jobs_cancelled} "
                                f"cancelled), {deleted.tokens_deleted} tokens")


def _tenants_quotas(args, client) -> int:
    limits = _quota_limits(args)
    if not limits:
        raise ValueError(f"give the quotas to change: {', '.join(_QUOTA_FLAGS)}")
    tenant = client.tenants.set_quotas(args.name, **limits)
    return _emit(args, tenant, lambda: print_fields(tenant.quotas))


def _token_issue(args, client) -> int:
    issued = client.tenants.issue_token(args.tenant, args.description)
    if args.json:
        print_json(issued)
    else:
        print(issued.token)
        print(f"token id {issued.id}: the secret is shown this once", file=sys.stderr)
    return 0


def _token_revoke(args, client) -> int:
    revoked = client.tenants.revoke_token(args.id)
    return _emit(args, {"revoked": revoked},
                 f"token {args.id} {'revoked' if revoked else 'was already revoked'}")
