"""`cotune bench rl`: what one engine that trains and samples the same adapter saves an RL
loop, against two systems that sync their weights through files.

Both ways run in this process, on this machine, with the same model and recipe:
  - one engine: an RL session (Runtime.open_session) samples from its own live weights;
  - two systems: a trainer (an RL session of one runtime, used for forward_backward and
    optim_step only) and a sampler (another runtime). After each optim_step the trainer
    writes the PEFT files and the sampler loads them, as a trainer beside vLLM does.

Weight sync: the seconds from optim_step returning to the first token of a one-token
Generate on the new weights, minus the same Generate on weights already in place, and the
bytes written; against one engine step (a decode step of one request). Loop speed: GRPO
steps per minute of cotune/grpo.py's loop (the loop of `cotune demo rl`), each way from the
same start. Both are medians over interleaved rounds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cotune import grpo
from cotune.adapters.peft_format import save_peft_adapter
from cotune.bench.serving import machine
from cotune.engine.finetune_spec import LoraSettings, OptimizerSettings
from cotune.engine.runtime import Request, Runtime
from cotune.engine.session_spec import Datum, LossSpec, SessionSpec
from cotune.grpo_demo import LORA, LR

DESIGNS = ("one engine", "two systems")
SPEC = SessionSpec("bench-rl", lora=LoraSettings(**LORA), optimizer=OptimizerSettings(lr=LR))


class _InProcess:
    """grpo.Policy's prompts and samples on a runtime: a session's live weights (one
    engine) or a PEFT directory (two systems)."""

    def __init__(self, sampler: Runtime):
        self.sampler = sampler

    def prompt_ids(self, question: str) -> list[int]:
        tokenizer = self.sampler.tokenizer
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids

    def sample(self, prompts: list[list[int]], group: int, max_tokens: int,
               seed: int) -> list[list[grpo.Sample]]:
        requests = [Request(prompt_token_ids=p, max_tokens=max_tokens, temperature=1.0,
                            logprobs=0, seed=seed + i * group + j, **self.source())
                    for i, p in enumerate(prompts) for j in range(group)]
        done = self.sampler.generate(requests)
        samples = [grpo.Sample(r.prompt_token_ids, c.token_ids,
                               [lp.logprob for lp in c.logprobs], c.text,
                               c.finish_reason == "stop") for r, c in zip(requests, done)]
        return [samples[i:i + group] for i in range(0, len(samples), group)]

    def source(self) -> dict:
        raise NotImplementedError


class OneEngine(_InProcess):
    def __init__(self, runtime: Runtime):
        super().__init__(runtime)
        self.session = runtime.open_session(SPEC)

    def source(self) -> dict:
        return {"session": self.session}

    def train(self, examples: list[dict]) -> None:
        self.session.forward_backward([Datum(**e) for e in examples],
                                      LossSpec("importance_sampling"))
        self.session.optim_step()

    def close(self) -> None:
        self.session.close()


class TwoSystems(_InProcess):
    def __init__(self, trainer: Runtime, sampler: Runtime, workdir: Path):
        super().__init__(sampler)
        self.session, self.workdir = trainer.open_session(SPEC), workdir
        self.bytes_written = 0
        self.current = self._publish()  # the start weights, as the sampler gets them

    def source(self) -> dict:
        return {"adapter": str(self.current)}

    def train(self, examples: list[dict]) -> None:
        self.session.forward_backward([Datum(**e) for e in examples],
                                      LossSpec("importance_sampling"))
        self.session.optim_step()
        self.current = self._publish()

    def _publish(self) -> Path:
        """The trainer writes its weights; the sampler's next request loads them."""
        path = self.workdir / f"{self.session.id}-w{self.session.weights_version}"
        save_peft_adapter(self.session.save().adapter, path)
        self.bytes_written += sum(f.stat().st_size for f in path.iterdir())
        return path

    def close(self) -> None:
        self.session.close()


def _first_token_seconds(runtime: Runtime, prompt: list[int], **source) -> float:
    started = time.perf_counter()
    runtime.generate([Request(prompt_token_ids=prompt, max_tokens=1, **source)])
    return time.perf_counter() - started


def _decode_step_seconds(runtime: Runtime, prompt: list[int]) -> float:
    """One engine step: a decode step of one request (16 tokens' time over 16)."""
    short = _first_token_seconds(runtime, prompt)
    started = time.perf_counter()
    runtime.generate([Request(prompt_token_ids=prompt, max_tokens=17, ignore_eos=True)])
    return (time.perf_counter() - started - short) / 16


def _sync_round(trainer: Runtime, sampler: Runtime, workdir: Path, prompt: list[int],
                batch: list[Datum]) -> dict:
    """Each way: a ForwardBackward and an OptimStep, then the sync: seconds from the
    OptimStep's return to the first token on the new weights, less a warm first token."""
    engine = OneEngine(trainer)
    engine.session.forward_backward(batch)
    engine.session.optim_step()
    first = _first_token_seconds(trainer, prompt, session=engine.session)
    warm = _first_token_seconds(trainer, prompt, session=engine.session)
    engine.close()
    two = TwoSystems(trainer, sampler, workdir)
    written = two.bytes_written
    two.session.forward_backward(batch)
    two.session.optim_step()
    started = time.perf_counter()
    path = two._publish()
    _first_token_seconds(sampler, prompt, adapter=str(path))
    two_first = time.perf_counter() - started
    two_warm = _first_token_seconds(sampler, prompt, adapter=str(path))
    two.close()
    return {"one engine": {"sync_s": first - warm, "bytes_written": 0},
            "two systems": {"sync_s": two_first - two_warm,
                            "bytes_written": two.bytes_written - written}}


def _loop(design: str, trainer: Runtime, sampler: Runtime, workdir: Path, steps: int,
          settings: grpo.Settings) -> dict:
    policy = OneEngine(trainer) if design == "one engine" else \
        TwoSystems(trainer, sampler, workdir)
    started = time.perf_counter()
    reports = grpo.run(policy, steps, settings)
    seconds = time.perf_counter() - started
    policy.close()
    return {"steps_per_min": 60 * steps / seconds, "seconds": seconds,
            "rewards": [r.mean_reward for r in reports]}


def run(rounds: int, steps: int, out: Path | None, model: str = "default",
        settings: grpo.Settings = grpo.DEFAULT_SETTINGS) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="cotune-bench-rl-"))
    trainer = Runtime.load(model, max_rank=LORA["rank"])  # one engine, and the trainer
    sampler = Runtime.load(model, max_rank=LORA["rank"])
    try:
        policy = _InProcess(trainer)
        prompt = policy.prompt_ids(grpo.QUESTIONS[0] + grpo.INSTRUCTION)
        batch = [Datum(prompt + prompt, [0.0] * len(prompt) + [1.0] * len(prompt))]
        step_s, syncs, loops = [], [], []
        for _ in range(rounds):  # interleaved: each round measures every way once
            step_s.append(_decode_step_seconds(trainer, prompt))
            syncs.append(_sync_round(trainer, sampler, workdir, prompt, batch))
            for design in DESIGNS:
                loops.append({"design": design, **_loop(design, trainer, sampler, workdir,
                                                        steps, settings)})
    finally:
        trainer.close()
        sampler.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result = _summarise(step_s, syncs, loops)
    result.update(rounds=rounds, steps=steps, model=model, machine=machine(),
                  recipe={"prompts": settings.prompts, "group": settings.group,
                          "max_tokens": settings.max_tokens, "lora": LORA, "lr": LR})
    if out is not None:
        _write(result, out)
    return result


def _summarise(step_s: list[float], syncs: list[dict], loops: list[dict]) -> dict:
    rows = {}
    for design in DESIGNS:
        ours = [loop for loop in loops if loop["design"] == design]
        rows[design] = {
            "sync_s": statistics.median(s[design]["sync_s"] for s in syncs),
            "bytes_written": statistics.median(s[design]["bytes_written"] for s in syncs),
            "steps_per_min": statistics.median(loop["steps_per_min"] for loop in ours),
            "rewards": [loop["rewards"] for loop in ours]}
    one, two = rows["one engine"], rows["two systems"]
    return {"engine_step_s": statistics.median(step_s), "designs": rows,
            "sync_saved_s": two["sync_s"] - one["sync_s"],
            "loop_speedup": one["steps_per_min"] / two["steps_per_min"]}


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl.json").write_text(json.dumps(result, indent=2) + "\n")
    step = result["engine_step_s"]
    recipe = result["recipe"]
    lines = [f"# cotune bench rl: {result['model']}, {result['machine']}", "",
             f"{result['rounds']} interleaved rounds, medians. GRPO loop (cotune/grpo.py) of "
             f"{result['steps']} steps a round: {recipe['prompts']} questions x "
             f"{recipe['group']} completions of up to {recipe['max_tokens']} tokens a step, "
             f"LoRA rank {recipe['lora']['rank']} on {len(recipe['lora']['targets'])} "
             f"projections, AdamW lr {recipe['lr']:g}. One engine step (a decode step of one "
             f"request): {step * 1000:.1f} ms.", "",
             "| design | weight sync (ms) | in engine steps | bytes written | "
             "RL steps/min |", "|---|---|---|---|---|"]
    for design, row in result["designs"].items():
        lines.append(f"| {design} | {row['sync_s'] * 1000:.1f} | {row['sync_s'] / step:.2f} | "
                     f"{row['bytes_written']:.0f} | {row['steps_per_min']:.2f} |")
    lines += ["", f"Loop speed, one engine over two systems: {result['loop_speedup']:.2f}x. "
              "Weight sync: the seconds from optim_step returning to the first token on the "
              "new weights, less the same first token on weights already in place.", "",
              "Mean reward per step, each round:"]
    for design, row in result["designs"].items():
        for rewards in row["rewards"]:
            lines.append(f"- {design}: {', '.join(f'{r:.2f}' for r in rewards)}")
    (out / "rl.md").write_text("\n".join(lines) + "\n")
