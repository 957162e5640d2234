"""`cotune demo rl`: GRPO over a real server. One engine samples from an RL session's live
weights and trains them, through the SDK, with nothing written to disk between the two; the
mean reward of each step is printed, and drawn as an SVG curve.

Without --address it starts `cotune serve` on the default model (SmolLM2-135M-Instruct) in a
temporary directory, and stops it at the end. The recipe is cotune/grpo.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.sax.saxutils import escape

from cotune import grpo
from cotune.client import Client

LORA = dict(rank=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"))
LR = 1e-3


class ServerPolicy:
    """grpo.Policy over a server: an RL session through the SDK."""

    def __init__(self, client: Client, session, lr: float = LR):
        self.client, self.session, self.lr = client, session, lr
        self._pool = ThreadPoolExecutor(64)  # a step's completions in flight at once

    def prompt_ids(self, question: str) -> list[int]:
        return self.client.tokenize(chat=[{"role": "user", "content": question}])

    def sample(self, prompts: list[list[int]], group: int, max_tokens: int,
               seed: int) -> list[list[grpo.Sample]]:
        def one(prompt: list[int], k: int) -> grpo.Sample:
            done = self.session.sample(prompt_token_ids=prompt, max_tokens=max_tokens,
                                       temperature=1.0, logprobs=0, seed=seed + k)
            return grpo.Sample(prompt, list(done.token_ids), [lp.logprob for lp in done.logprobs],
                               done.text, done.finish_reason == "stop")

        futures = [[self._pool.submit(one, p, i * group + j) for j in range(group)]
                   for i, p in enumerate(prompts)]
        return [[f.result() for f in group_futures] for group_futures in futures]

    def train(self, examples: list[dict]) -> None:
        self.session.forward_backward(examples, "importance_sampling")
        self.session.optim_step(lr=self.lr)

    def close(self) -> None:
        self._pool.shutdown()


def run_rl_demo(steps: int, out: Path, address: str | None = None,
                token: str | None = None, model: str = "default") -> list[grpo.StepReport]:
    """Runs `steps` GRPO steps against the server at `address` (or one it starts); writes
    grpo-reward.json and grpo-reward.svg under `out`."""
    from cotune.bench.server_process import start_server

    server = workdir = None
    if address is None:
        workdir = Path(tempfile.mkdtemp(prefix="cotune-rl-demo-"))
        print(f"starting cotune serve on {model} ...", flush=True)
        server = start_server(workdir, "--model", model, "--max-rank", str(LORA["rank"]))
        address, token = server.address, server.admin_token
    try:
        with Client(address, token) as client:
            session = client.sessions.create("grpo-one-word", lr=LR, seed=0, **LORA)
            print(f"session {session.id} on {address}: GRPO, {grpo.DEFAULT_SETTINGS.prompts} "
                  f"questions x {grpo.DEFAULT_SETTINGS.group} completions a step", flush=True)
            policy = ServerPolicy(client, session)
            try:
                reports = grpo.run(policy, steps, on_step=_print_step)
            finally:
                policy.close()
            version = session.save()
            print(f"saved the trained weights as {version.ref}")
            session.close()
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo-reward.json").write_text(json.dumps(
        [{"step": r.step, "mean_reward": r.mean_reward, "trained_on": r.trained_on,
          "sample_seconds": round(r.sample_seconds, 2),
          "train_seconds": round(r.train_seconds, 2), "examples": r.examples}
         for r in reports], indent=2) + "\n")
    (out / "grpo-reward.svg").write_text(reward_curve_svg(reports))
    print(f"written: {out / 'grpo-reward.json'}, {out / 'grpo-reward.svg'}")
    return reports


def _print_step(report: grpo.StepReport) -> None:
    print(f"step {report.step:3d}  mean reward {report.mean_reward:.2f}  "
          f"(sampled {report.sample_seconds:.1f} s, trained {report.train_seconds:.1f} s)  "
          f"e.g. {report.examples[:2]}", flush=True)


def reward_curve_svg(reports: list[grpo.StepReport], width: int = 560,
                     height: int = 300) -> str:
    """The mean reward per step, and the wall-clock time it took, as a plain SVG line."""
    left, right, top, bottom = 50, 20, 30, 45
    plot_w, plot_h = width - left - right, height - top - bottom
    last = max(1, len(reports) - 1)
    elapsed, seconds = [], 0.0
    for r in reports:
        seconds += r.sample_seconds + r.train_seconds
        elapsed.append(seconds)

    def point(step: int, value: float) -> str:
        return f"{left + plot_w * step / last:.1f},{top + plot_h * (1 - value):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14">GRPO, one-word answers, SmolLM2-135M on '
             f'the CPU: mean reward per step ({elapsed[-1] / 60 if elapsed else 0:.1f} min)'
             '</text>']
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    for r, t in zip(reports, elapsed):
        if r.step % max(1, len(reports) // 8) == 0 or r.step == len(reports) - 1:
            x = left + plot_w * r.step / last
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                         f'{r.step}</text>')
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 30}" text-anchor="middle" '
                         f'fill="#888">{t:.0f}s</text>')
    line = " ".join(point(r.step, r.mean_reward) for r in reports)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    parts += [f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="#1f77b4"/>'
              for p in line.split()]
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 2}" text-anchor="middle">'
                 f'{escape("step (and seconds since the start)")}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
