"""The `cotune` client commands as users run them (`.venv/bin/cotune` subprocesses with
COTUNE_ADDR and COTUNE_TOKEN) against a real `cotune serve` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from server_helpers import running_server, tiny_adapter_dir

from cotune.client import Client
from cotune.client.files import ADAPTER_FILES

pytestmark = pytest.mark.slow

COTUNE = str(Path(sys.executable).parent / "cotune")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return tiny_adapter_dir(tmp_path_factory.mktemp("adapter") / "peft", seed=3)


def _cotune(server, *args: str, token: str | None = None, stdin: str = ""):
    env = dict(os.environ, COTUNE_ADDR=server.address,
               COTUNE_TOKEN=server.admin_token if token is None else token)
    return subprocess.run([COTUNE, *args], env=env, input=stdin, capture_output=True,
                          text=True, timeout=120)


def _json(server, *args: str, token: str | None = None):
    result = _cotune(server, *args, "--json", token=token)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_adapter_lifecycle_in_json(server, adapter_dir, tmp_path):
    first = _json(server, "adapters", "import", "cli-adapter", str(adapter_dir),
                  "--description", "from the CLI", "--label", "team=search")
    assert (first["name"], first["version"]) == ("cli-adapter", 1)
    second = _json(server, "adapters", "import", "cli-adapter", str(adapter_dir))
    assert second["version"] == 2 and second["sha256"] == first["sha256"]

    listed = _json(server, "adapters", "list", "--label", "team=search")
    assert [(a["name"], a["latest_version"]) for a in listed] == [("cli-adapter", 2)]
    shown = _json(server, "adapters", "show", "cli-adapter")
    assert shown["description"] == "from the CLI" and shown["labels"] == {"team": "search"}
    versions = _json(server, "adapters", "versions", "cli-adapter")
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["provenance"]["source"] == "upload"

    exported = Path(_json(server, "adapters", "export", "cli-adapter@v1",
                          str(tmp_path / "out"))["path"])
    for name in ADAPTER_FILES:
        assert (exported / name).read_bytes() == (adapter_dir / name).read_bytes()
    again = _cotune(server, "adapters", "export", "cli-adapter", str(exported))
    assert again.returncode == 2 and "exists" in again.stderr

    refused = _cotune(server, "adapters", "delete", "cli-adapter", stdin="")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert _json(server, "adapters", "delete", "cli-adapter@v1", "--yes") == {
        "versions_deleted": 1}
    assert _json(server, "adapters", "delete", "cli-adapter", "--yes") == {
        "versions_deleted": 1}
    missing = _cotune(server, "adapters", "show", "cli-adapter")
    assert missing.returncode == 2
    assert missing.stderr.startswith("cotune: error: NOT_FOUND: ") and "cli-adapter" in \
        missing.stderr


def test_files_are_uploaded_listed_downloaded_trained_on_and_deleted(server, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat"}) + "\n"
                            for i in range(4)))
    file = _json(server, "files", "upload", str(data))
    assert (file["filename"], file["purpose"], file["size_bytes"]) == \
        ("train.jsonl", "fine-tune", data.stat().st_size)
    assert [f["id"] for f in _json(server, "files", "list")] == [file["id"]]
    assert _json(server, "files", "show", file["id"]) == file
    copy = tmp_path / "copy.jsonl"
    assert _json(server, "files", "download", file["id"], str(copy))["size_bytes"] == \
        data.stat().st_size
    assert copy.read_bytes() == data.read_bytes()
    again = _cotune(server, "files", "download", file["id"], str(copy))
    assert again.returncode == 2 and "exists" in again.stderr
    job = json.loads(_cotune(server, "finetune", "from-a-file", "--training-file", file["id"],
                             "--max-steps", "1", "--detach", "--json").stdout)
    assert job["training_file"] == file["id"]
    refused = _cotune(server, "files", "delete", file["id"], stdin="")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert _json(server, "files", "delete", file["id"], "--yes") == {"deleted": file["id"]}
    assert _json(server, "files", "list") == []
    both = _cotune(server, "finetune", "x", "--data", str(data), "--training-file", file["id"])
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_tenant_and_its_token(server):
    tenant = _json(server, "tenants", "create", "cli-tenant", "--max-adapters", "7")
    assert tenant["name"] == "cli-tenant" and tenant["quotas"]["max_adapters"] == 7
    issued = _json(server, "tenants", "token", "issue", "cli-tenant", "--description", "ci")
    assert issued["token"].startswith("ct_")
    assert _json(server, "adapters", "list", token=issued["token"]) == []
    quotas = _json(server, "tenants", "quotas", "cli-tenant", "--max-jobs", "1",
                   "--max-sessions", "2")["quotas"]
    assert (quotas["max_adapters"], quotas["max_concurrent_jobs"]) == (7, 1)
    assert quotas["max_sessions"] == 2
    shown = _json(server, "tenants", "show", "cli-tenant")
    assert [t["description"] for t in shown["tokens"]] == ["ci"]
    denied = _cotune(server, "tenants", "list", token=issued["token"])
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr


def test_the_readme_tenant_keeps_the_default_quotas_it_does_not_name(server):
    tenant = _json(server, "tenants", "create", "acme", "--max-adapters", "100", "--max-jobs",
                   "2", "--max-tokens-per-minute", "0")
    quotas = tenant["quotas"]
    assert (quotas["max_adapters"], quotas["max_concurrent_jobs"]) == (100, 2)
    # serve's --default-max-versions and --default-max-queued; 0 on the wire is "no limit"
    assert (quotas["max_versions_per_adapter"], quotas["max_queued_requests"]) == (1000, 64)
    assert quotas["max_tokens_per_minute"] is None
    assert quotas["max_sessions"] == 4  # serve's --default-max-sessions


def test_an_admin_lists_and_cancels_any_tenants_job_and_deletes_the_tenant(server, tmp_path):
    _json(server, "tenants", "create", "leaving")
    token = _json(server, "tenants", "token", "issue", "leaving")["token"]
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n' * 12)
    job = _json(server, "finetune", "slow", "--data", str(data), "--max-steps", "100000",
                "--batch-size", "1", "--detach", token=token)
    assert job["id"] not in {j["id"] for j in _json(server, "jobs", "list")}  # the admin's own
    listed = _cotune(server, "jobs", "list", "--all-tenants")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job["id"] in line)
    assert row.split()[:2] == ["leaving", job["id"]]
    denied = _cotune(server, "jobs", "list", "--all-tenants", token=token)
    assert denied.returncode == 2 and "PERMISSION_DENIED: all_tenants needs an admin token" \
        in denied.stderr
    cancelled = _json(server, "jobs", "cancel", job["id"], "--all-tenants")
    assert (cancelled["state"], cancelled["tenant"]) == ("cancelled", "leaving")
    refused = _cotune(server, "tenants", "delete", "leaving")  # no terminal, no --yes
    assert refused.returncode == 2 and "needs --yes" in refused.stderr
    deleted = _cotune(server, "tenants", "delete", "leaving", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == "deleted tenant leaving: 0 adapters (0 versions), 1 jobs " \
                                     "(0 cancelled), 1 tokens"
    gone = _cotune(server, "jobs", "list", token=token)
    assert gone.returncode == 2 and "UNAUTHENTICATED" in gone.stderr
    admin = _cotune(server, "tenants", "delete", "admin", "--yes")
    assert admin.returncode == 2 and "FAILED_PRECONDITION" in admin.stderr


def test_generate_on_the_server_prints_the_streamed_text(server, adapter_dir):
    _json(server, "adapters", "import", "cli-gen", str(adapter_dir))
    result = _cotune(server, "generate", "--addr", "Tell me a story", "--adapter",
                     "cli-gen", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    with Client(server.address, server.admin_token) as client:
        expected = client.complete("Tell me a story", adapter="cli-gen", max_tokens=8)
    assert result.stdout == expected.text + "\n"
    lines = _cotune(server, "generate", "--addr", server.address, "Tell me a story",
                    "--adapter", "cli-gen", "--max-tokens", "8", "--json")
    deltas = [json.loads(line) for line in lines.stdout.splitlines()]
    assert "".join(d["text"] for d in deltas) == expected.text
    assert deltas[-1]["finish_reason"] in ("stop", "length")


def test_generate_server_is_an_alias_of_addr_and_both_take_the_wires_16_tokens(server):
    """The tiny model has no end of sequence: a generation runs to its max_tokens."""
    for flag in ("--addr", "--server"):
        result = _cotune(server, "generate", flag, server.address, "Tell me", "--json")
        assert result.returncode == 0, result.stderr
        deltas = [json.loads(line) for line in result.stdout.splitlines()]
        assert sum(len(d["token_ids"]) for d in deltas) == 16
        assert deltas[-1]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def tuned(server, tmp_path_factory):
    """`cotune finetune` of a new adapter, run to its end with every setting the CLI has."""
    data = tmp_path_factory.mktemp("tuned") / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n' * 12)
    return data, _cotune(
        server, "finetune", "cli-tuned", "--data", str(data), "--rank", "4", "--alpha", "8",
        "--targets", "q_proj,v_proj", "--dropout", "0.05", "--lr", "0.001", "--weight-decay",
        "0.1", "--max-grad-norm", "0.5", "--schedule", "linear", "--warmup", "1",
        "--max-steps", "4", "--checkpoint-every", "2", "--batch-size", "2",
        "--grad-accumulation", "2", "--max-length", "64", "--eval-fraction", "0.25",
        "--seed", "7", "--min-share", "0.2")


def test_finetune_watches_the_job_to_its_versions(server, tuned):
    _, result = tuned
    assert result.returncode == 0, result.stderr
    assert ": training cli-tuned from new weights" in result.stdout
    assert "checkpoint at step 2: cli-tuned@v1" in result.stdout
    assert "succeeded: cli-tuned@v1, cli-tuned@v2 published" in result.stdout
    assert "step 4/4" in result.stderr  # the progress line: one line an update off a terminal
    jobs = _json(server, "jobs", "list", "--state", "succeeded")
    job_id = next(j["id"] for j in jobs if j["adapter"] == "cli-tuned")
    events = _cotune(server, "jobs", "watch", job_id, "--json")
    assert events.returncode == 0
    assert json.loads(events.stdout.splitlines()[0])["kind"] == "state"


def test_every_finetune_flag_reaches_the_jobs_settings(server, tuned):
    assert tuned[1].returncode == 0, tuned[1].stderr
    job = next(j for j in _json(server, "jobs", "list") if j["adapter"] == "cli-tuned")
    settings = job["hyperparameters"]
    assert settings["lora"] == {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"],
                                "dropout": 0.05}
    assert settings["optimizer"] == {"lr": 0.001, "weight_decay": 0.1, "max_grad_norm": 0.5}
    assert {k: settings[k] for k in ("schedule", "warmup_steps", "max_steps",
                                     "checkpoint_every", "batch_size", "grad_accumulation",
                                     "max_length", "eval_fraction", "seed", "min_share")} == {
        "schedule": "linear", "warmup_steps": 1, "max_steps": 4, "checkpoint_every": 2,
        "batch_size": 2, "grad_accumulation": 2, "max_length": 64, "eval_fraction": 0.25,
        "seed": 7, "min_share": 0.2}


def test_a_bad_finetune_setting_is_refused_naming_what_is_accepted(server, tuned):
    result = _cotune(server, "finetune", "cli-refused", "--data", str(tuned[0]), "--schedule",
                     "steps")
    assert result.returncode == 2
    assert "schedule 'steps' not accepted; choose from constant, linear, cosine" in \
        result.stderr


def test_versions_table_shows_provenance_and_metrics_with_integers_as_integers(server, tuned):
    assert tuned[1].returncode == 0, tuned[1].stderr
    table = _cotune(server, "adapters", "versions", "cli-tuned")
    assert table.returncode == 0, table.stderr
    header, first, second = [re.split(r"\s{2,}", line) for line in table.stdout.splitlines()]
    assert header[6:12] == ["SOURCE", "PARENT", "JOB", "DATASET", "SETTINGS", "METRICS"]
    job_id = _json(server, "adapters", "versions", "cli-tuned")[0]["provenance"]["job_id"]
    assert first[6:9] == ["job", "-", job_id] and second[6:9] == ["job", "1", job_id]
    settings = first[10].split(", ")
    for setting in ("rank=4", "alpha=8", "dropout=0.05", "max_steps=4", "schedule=linear"):
        assert setting in settings
    assert "eval_loss=" in first[11] and "train_loss=" in first[11]
    assert ".0," not in table.stdout and ".0 " not in table.stdout


def test_a_reader_that_goes_away_ends_the_command_quietly(server, tuned):
    """`cotune adapters versions NAME | head -0`: no "Broken pipe", no traceback; the status
    a command that SIGPIPE ends has (128 + 13)."""
    env = dict(os.environ, COTUNE_ADDR=server.address, COTUNE_TOKEN=server.admin_token)
    proc = subprocess.Popen([COTUNE, "adapters", "versions", "cli-tuned"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes a byte
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert stderr == b""


def _weights(server, ref: str, dest: Path) -> dict:
    exported = Path(_json(server, "adapters", "export", ref, str(dest))["path"])
    return load_file(exported / "adapter_model.safetensors")


def test_finetune_of_an_existing_adapter_continues_its_newest_version_and_says_so(
        server, tuned, tmp_path):
    """At an lr of 1e-12 a job barely moves its weights: v3 is v2, not new weights."""
    data, first = tuned
    assert first.returncode == 0, first.stderr
    result = _cotune(server, "finetune", "cli-tuned", "--data", str(data), "--max-steps", "1",
                     "--lr", "1e-12")
    assert result.returncode == 0, result.stderr
    assert ": continuing cli-tuned@v2 from its weights, at rank 4 with its settings" in \
        result.stdout
    assert "succeeded: cli-tuned@v3 published" in result.stdout
    v3 = _json(server, "adapters", "versions", "cli-tuned")[2]
    assert (v3["version"], v3["rank"], v3["alpha"]) == (3, 4, 8)
    assert v3["provenance"]["parent_version"] == 2
    settings = v3["provenance"]["hyperparameters"]  # v2's, but for those given
    assert (settings["max_steps"], settings["optimizer"]["lr"]) == (1, 1e-12)
    assert (settings["schedule"], settings["seed"], settings["optimizer"]["weight_decay"]) == (
        "linear", 7, 0.1)
    before, after = _weights(server, "cli-tuned@v2", tmp_path / "v2"), \
        _weights(server, "cli-tuned@v3", tmp_path / "v3")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.allclose(after[name], tensor, atol=1e-6), name
    assert any("lora_B" in name and tensor.abs().max() > 1e-4 for name, tensor in before.items())


def test_continuing_at_another_rank_is_refused_and_from_scratch_starts_anew(server, tuned):
    data, first = tuned
    assert first.returncode == 0, first.stderr
    refused = _cotune(server, "finetune", "cli-tuned", "--data", str(data), "--rank", "8")
    assert refused.returncode == 2
    assert "INVALID_ARGUMENT: cli-tuned@v" in refused.stderr
    assert "has rank 4, and a job that continues it keeps them; leave rank unset, or train " \
           "the adapter from scratch (from_scratch) at rank 8" in refused.stderr
    anew = _cotune(server, "finetune", "cli-tuned", "--data", str(data), "--rank", "8",
                   "--max-steps", "1", "--from-scratch")
    assert anew.returncode == 0, anew.stderr
    assert ": training cli-tuned from new weights" in anew.stdout
    newest = _json(server, "adapters", "versions", "cli-tuned")[-1]
    assert (newest["rank"], newest["provenance"]["parent_version"]) == (8, None)


def test_a_bad_token_exits_2_with_unauthenticated_and_no_traceback(server):
    result = _cotune(server, "adapters", "list", token="ct_not_a_token")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("cotune: error: UNAUTHENTICATED: ")
    assert "Traceback" not in result.stderr


def test_a_missing_token_points_to_cotune_token_and_the_token_flag(server):
    """Not to the wire's 'authorization' header, which the server would have named."""
    unset = {k: v for k, v in os.environ.items() if k != "COTUNE_TOKEN"}
    runs = [subprocess.run([COTUNE, *args], env=dict(unset, COTUNE_ADDR=server.address),
                           capture_output=True, text=True, timeout=120)
            for args in (["adapters", "list"], ["generate", "--addr", "--max-tokens", "2",
                                                "hi"])]
    runs.append(_cotune(server, "jobs", "list", token=""))  # set, but empty
    for result in runs:
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr == "cotune: error: no token: pass --token TOKEN or set " \
                                "COTUNE_TOKEN; an admin issues tokens with `cotune tenants " \
                                "token issue TENANT`\n"


def test_the_client_commands_do_not_import_torch():
    code = "import sys, cotune.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
