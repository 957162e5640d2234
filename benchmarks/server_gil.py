"""What the server's threads cost the engine thread that shares their GIL: the ceiling of what
an engine core in its own process could gain.

    .venv/bin/python -m cotune.bench.server_gil [--concurrency 24] [--duration 20] [--rounds 3]

A real `cotune serve` on the default model and 8 adapters, loaded by the SDK with a closed
loop of requests (each up to 32 tokens), alone and beside a fine-tuning job, in interleaved
rounds. Each round reads, from /proc, the CPU seconds of every thread of the server, and from
its /metrics the seconds its engine spent in steps:

- **engine busy**: step seconds over wall seconds;
- **engine on CPU**: the engine thread's CPU seconds over wall seconds (the busiest thread);
- **off CPU in steps**: busy minus on CPU, the time the engine was inside a step but not
  running: waiting for the GIL (or for a core). An engine in its own process recovers at
  most this;
- **other threads**: the CPU of every other thread of the server (gRPC, handlers, the
  adapter loader), and that per served token: the GIL time the serving side takes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from cotune.bench.coserve import Server, _make_adapters, _one
from cotune.bench.serving import machine

TICKS = os.sysconf("SC_CLK_TCK")
METRIC = re.compile(r"^(cotune_step_duration_seconds_sum)\s+(\S+)$", re.M)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def step_seconds(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    return float(METRIC.search(text)[2])


def closed_loop_tokens(server: Server, concurrency: int, duration: float) -> int:
    """Tokens generated with `concurrency` requests always in flight for `duration` s."""
    counted, stop = [], time.monotonic() + duration

    def worker(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            counted.append(_one(server.client, i, server.adapters, 32).tokens)
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counted)


def measure(server: Server, metrics_port: int, concurrency: int, duration: float) -> dict:
    pid = server.process.proc.pid
    cpu_before, steps_before = thread_cpu_seconds(pid), step_seconds(metrics_port)
    started = time.monotonic()
    tokens = closed_loop_tokens(server, concurrency, duration)
    wall = time.monotonic() - started
    cpu_after, steps_after = thread_cpu_seconds(pid), step_seconds(metrics_port)
    used = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    engine = max(used.values())
    others = sum(used.values()) - engine
    busy = (steps_after - steps_before) / wall
    return {"tokens_per_s": tokens / wall, "engine_busy": busy, "engine_on_cpu": engine / wall,
            "off_cpu_in_steps": max(0.0, busy - engine / wall), "other_threads": others / wall,
            "other_us_per_token": others / max(tokens, 1) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cotune-gil-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    server = Server(workdir, "server", _make_adapters(8, workdir), "--threads", "1",
                    "--metrics-port", str(metrics_port))
    scenarios = {"serving": lambda: None, "serving + job": server.start_job}
    rounds: dict[str, list[dict]] = {name: [] for name in scenarios}
    try:
        closed_loop_tokens(server, args.concurrency, 5.0)  # warm up
        for _ in range(args.rounds):
            for name, begin in scenarios.items():
                begin()
                rounds[name].append(measure(server, metrics_port, args.concurrency,
                                            args.duration))
                if server.job_id is not None:
                    server.stop_job()
                print(name, {k: round(v, 3) for k, v in rounds[name][-1].items()}, flush=True)
    finally:
        server.close()
    result = {"benchmark": "server_gil", "machine": machine(), "concurrency": args.concurrency,
              "duration_s": args.duration, "rounds": rounds,
              "medians": {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                          for name, runs in rounds.items()}}
    write(result, args.out)
    print((args.out / "server_gil.md").read_text())


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "server_gil.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# The server's threads against its engine thread ({result['concurrency']} "
             "requests in flight, SmolLM2, 8 adapters, 1 torch thread)", "",
             f"Machine: {result['machine']}. {result['duration_s']:.0f} s a round, "
             f"{len(next(iter(result['rounds'].values())))} interleaved rounds, medians. "
             "Shares are of one core.", "",
             "| scenario | tokens/s | engine busy | engine on CPU | off CPU in steps | "
             "other threads | other threads, us per token |", "|---|---|---|---|---|---|---|"]
    for name, m in result["medians"].items():
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['engine_busy']:.1%} | "
                     f"{m['engine_on_cpu']:.1%} | {m['off_cpu_in_steps']:.1%} | "
                     f"{m['other_threads']:.1%} | {m['other_us_per_token']:.0f} |")
    (out_dir / "server_gil.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
