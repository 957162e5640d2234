"""Fair shares under a flood (`cotune bench fairness`), through a real `cotune serve` on the
default model and the SDK: what a tenant with a few small requests sees while another tenant
floods the server.

Tenant "light" sends requests of 4 new tokens one after another. Tenant "flood" keeps
`flood` generations of up to 64 tokens in flight, each replaced as it ends. Light's latency
(the call, from its start to its last token) is measured:
  - unloaded: light alone;
  - isolated (1.5) and (1.25): light beside the flood, as two tenants, on servers with
    --tenant-isolation 1.5 and 1.25 (a step beside light's requests takes at most that many
    times what they would take alone; the flood's tokens slow down instead);
  - fair shares: the same on a server with the default, no isolation (only fair shares of
    the decodes the TPOT target allows);
  - one tenant: the same requests sent as the flood's own tenant, which no tenant share
    protects (what every request got before the fair shares).
The five run interleaved over rounds on three servers started side by side (each idles while
the other is measured), each point `duration` seconds; medians of the
rounds' p50 and p99 are reported, with the flood's tokens per second. Target (issue 18):
under the flood, light's p99 at most 2 x its unloaded p99.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from cotune.bench.coserve import _CHAT, _quantile
from cotune.bench.server_process import start_server
from cotune.bench.serving import machine
from cotune.client import Client

SMALL_TOKENS, FLOOD_TOKENS = 4, 64
SYSTEMS = ("unloaded", "isolated (1.5)", "isolated (1.25)", "fair shares", "one tenant")
# the servers, by the --tenant-isolation they run with (None: the default, 0)
SERVER_OF = {"unloaded": None, "isolated (1.5)": "1.5", "isolated (1.25)": "1.25",
             "fair shares": None, "one tenant": None}


def _call_seconds(client: Client, prompt: str, max_tokens: int,
                  on_tokens=lambda count: None) -> float:
    """Seconds from the call to its last token; `on_tokens(count)` as tokens arrive."""
    started = time.monotonic()
    for delta in client.generate(prompt, max_tokens=max_tokens, timeout=600):
        on_tokens(len(delta.token_ids))
    return time.monotonic() - started


class Flood:
    """`concurrency` generations of one client always in flight, until `stop`."""

    def __init__(self, client: Client, concurrency: int):
        self.tokens, self._stop = 0, threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, args=(client, k), daemon=True)
                         for k in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _worker(self, client: Client, k: int) -> None:
        i = k
        while not self._stop.is_set():
            prompt = _CHAT.format(f"Tell a long story about the number {i}.")
            _call_seconds(client, prompt, FLOOD_TOKENS, self._count)  # as they stream
            i += len(self._threads)

    def _count(self, tokens: int) -> None:
        with self._lock:
            self.tokens += tokens

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _light_calls(client: Client, duration: float) -> list[float]:
    """Light's small requests one after another for `duration` seconds: their latencies."""
    latencies, stop, i = [], time.monotonic() + duration, 0
    while time.monotonic() < stop:
        prompt = _CHAT.format(f"Name a colour ({i}).")
        latencies.append(_call_seconds(client, prompt, SMALL_TOKENS))
        i += 1
    return latencies


def _point(system: str, light: Client, flood: Client, flood_concurrency: int,
           duration: float) -> dict:
    running = None
    if system != "unloaded":
        running = Flood(flood, flood_concurrency)
        time.sleep(2.0)  # the flood's requests are all running
    started, tokens_before = time.monotonic(), running.tokens if running else 0
    latencies = _light_calls(flood if system == "one tenant" else light, duration)
    flood_tps = None
    if running is not None:
        flood_tps = (running.tokens - tokens_before) / (time.monotonic() - started)
        running.stop()
    return {"system": system, "calls": len(latencies), "p50_s": _quantile(latencies, 0.5),
            "p99_s": _quantile(latencies, 0.99), "flood_tokens_per_s": flood_tps}


def run(duration: float, rounds: int, flood_concurrency: int, ttft_target: float | None,
        tpot_target: float | None, out_dir: Path) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="cotune-fairness-"))
    flags = [f"--{name}-target={value}" for name, value in (("ttft", ttft_target),
                                                            ("tpot", tpot_target))
             if value is not None]
    servers, clients = {}, {}
    try:
        for isolation in set(SERVER_OF.values()):
            extra = [] if isolation is None else ["--tenant-isolation", isolation]
            servers[isolation] = start_server(
                workdir / f"server-{isolation}", "--max-queued-requests",
                str(flood_concurrency + 16), *flags, *extra)
            clients[isolation] = _tenants(servers[isolation], flood_concurrency)
        points = [_point(system, *clients[SERVER_OF[system]], flood_concurrency, duration)
                  for _ in range(rounds) for system in SYSTEMS]
    finally:
        for pair in clients.values():
            for client in pair:
                client.close()
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result = _summarise(points, dict(duration_s=duration, rounds=rounds,
                                     flood_in_flight=flood_concurrency,
                                     ttft_target_s=ttft_target, tpot_target_s=tpot_target))
    _write(result, out_dir)
    return result


def _tenants(server, flood_concurrency: int) -> tuple[Client, Client]:
    """(light's client, flood's client) of two new tenants of `server`, warmed up."""
    admin = Client(server.address, server.admin_token)
    clients = []
    # the flood holds its requests in flight; "one tenant" sends light's as one more
    for name, in_flight in (("light", 4), ("flood", flood_concurrency + 1)):
        admin.tenants.create(name, max_queued_requests=in_flight)
        clients.append(Client(server.address, admin.tenants.issue_token(name).token))
    admin.close()
    _light_calls(clients[0], 3.0)  # warm
    return clients[0], clients[1]


def _summarise(points: list[dict], settings: dict) -> dict:
    systems = {}
    for system in SYSTEMS:
        mine = [p for p in points if p["system"] == system]
        systems[system] = {key: _median([p[key] for p in mine])
                           for key in ("calls", "p50_s", "p99_s", "flood_tokens_per_s")}
    unloaded = systems["unloaded"]["p99_s"]
    for summary in systems.values():
        summary["p99_over_unloaded"] = summary["p99_s"] / unloaded if unloaded else None
    return {"machine": machine(), "settings": settings, "systems": systems, "points": points}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fairness.json").write_text(json.dumps(result, indent=2))
    s = result["settings"]
    lines = [f"# bench fairness ({result['machine']})", "",
             f"Tenant light: requests of {SMALL_TOKENS} tokens, one at a time; tenant flood: "
             f"{s['flood_in_flight']} generations of up to {FLOOD_TOKENS} tokens in flight. "
             f"{s['rounds']} interleaved rounds of {s['duration_s']:g} s a point (medians); "
             f"the server's TTFT target {s['ttft_target_s'] or 'its default'}, TPOT target "
             f"{s['tpot_target_s'] or 'its default'} (s).", "",
             "| light's requests | calls | p50 s | p99 s | p99 / unloaded | flood tokens/s |",
             "|---|---|---|---|---|---|"]
    for system, m in result["systems"].items():
        flood = "" if m["flood_tokens_per_s"] is None else f"{m['flood_tokens_per_s']:.1f}"
        lines.append(f"| {system} | {m['calls']:g} | {m['p50_s']:.3f} | {m['p99_s']:.3f} | "
                     f"{m['p99_over_unloaded']:.2f}x | {flood} |")
    lines += ["", "Target: isolated at most 2.00x."]
    (out_dir / "fairness.md").write_text("\n".join(lines) + "\n")
