"""Examples trained piece by piece (token-level training), for whatever trains an adapter in
the engine's steps: a fine-tuning job (trainer.py) or an RL session (session.py).

An example runs as pieces over several steps when a step has room for only part of it. Each
piece's forward attends over the keys and values of the earlier pieces
(training_rows.ExampleKV); once the last piece is forwarded, the pieces' backward runs in
reverse order, again over as many steps as it needs. Each example brings its own loss, a sum
over its rows, so the gradients of its pieces add up to those of the whole example. An
example only forwarded (its loss None) keeps no backward.

    pieces = ExamplePieces(model, lora, next_run)  # next_run: the next example to start
    work = TrainingWork(); pieces.plan(work, seconds, cost, max_tokens)
    ... one forward pass over inference rows and work.pieces' rows ...
    loss, tokens = pieces.train(work, hidden_of_those_rows, model.logits, rows)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cotune.engine.evaluation import EvalItem
from cotune.model.llama import CausalLM
from cotune.model.lora_routing import TrainableLora
from cotune.model.training_rows import ExampleKV, TrainingPiece, TrainingRows

# seconds of a step's training work: cost(forward tokens, backward tokens, backward passes)
Cost = Callable[[int, int, int], float]
# The loss of rows [start, start + n) of an example from their logits (n, vocab): a scalar
# with the pass's graph, summed over those rows; or None for an example only forwarded.
RowLoss = Callable[[torch.Tensor, int, int], torch.Tensor | None]


@dataclass
class ExampleRun:
    """An example on its way through forward and backward."""

    token_ids: list[int]
    loss: RowLoss
    trains: bool = True  # False: forwarded only (its loss gives None), no backward
    kv: ExampleKV | None = None  # made when the example runs as more than one piece
    planned: int = 0  # tokens whose forward is planned (run: `held`)
    # (piece, its loss with its pass's graph, the pass's rows) forwarded alone, backward not
    # yet run; in order
    held: list[tuple[TrainingPiece, torch.Tensor, TrainingRows]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        """Forwarded whole (once its pass ran), and nothing of its backward left."""
        return self.planned == self.length and not self.held


@dataclass
class TrainingWork:
    """A step's training work, as `ExamplePieces.plan` (or a job's evaluation) chose it.

    pieces:        forwarded in the step's pass, rows in this order. One backward covers
                   them all (they share the pass's graph): in this step when `backward_now`,
                   else later, when the pass holds a single piece of a split example.
    held_backward: (example, count) the backward of its `count` newest held pieces, each
                   forwarded alone in an earlier pass, newest first.
    evaluation:    examples of a version's evaluation, forwarded in passes of their own
                   (a job that is publishing a version trains no more until it is out).
    """

    pieces: list[TrainingPiece] = field(default_factory=list)
    runs: list[ExampleRun] = field(default_factory=list)  # the example of each piece
    backward_now: bool = False
    held_backward: list[tuple[ExampleRun, int]] = field(default_factory=list)
    forward_tokens: int = 0
    backward_tokens: int = 0
    backward_passes: int = 0  # graphs whose backward runs in this step
    evaluation: list[EvalItem] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.forward_tokens or self.backward_tokens or self.evaluation)

    @property
    def needs_grad(self) -> bool:
        """Whether the pass over `pieces` must record a graph (some piece trains)."""
        return any(run.trains for run in self.runs)

    def token_ids(self) -> list[list[int]]:
        """The token ids of each piece, in the order of `pieces`."""
        return [run.token_ids[piece.start:piece.start + piece.length]
                for piece, run in zip(self.pieces, self.runs)]


class ExamplePieces:
    def __init__(self, model: CausalLM, lora: TrainableLora,
                 next_run: Callable[[], ExampleRun | None]):
        """`next_run`: the next example to start (None when there is none now)."""
        self.model, self.lora, self._next_run = model, lora, next_run
        self.runs: list[ExampleRun] = []  # started, forward or backward not done

    @property
    def partial_examples(self) -> int:
        """Examples forwarded in part: the rest of them runs in later steps."""
        return sum(0 < run.planned < run.length for run in self.runs)

    def plan(self, work: TrainingWork, seconds: float, cost: Cost, max_tokens: int,
             split: bool = True, at_least_one: bool = False) -> None:
        """Adds to `work` what fits in `seconds` by `cost`, with at most `max_tokens` forward
        rows. First the backward of held pieces (oldest example first, newest piece first);
        then whole examples, forward and backward in this step, as long as they fit; then a
        piece of the next example, sized so that its own backward fits a room like this
        one, and evenly (a stub of a last piece would cost a pass of its own). A piece that
        is not its example's last goes alone in its pass (the pieces of a pass share one
        backward). `split`: False keeps every example whole. `at_least_one`: the smallest
        unit of work even when nothing fits (the job's floor, or nothing served)."""

        def fits(forward: int, backward: int = 0, passes: int = 0, unit: bool = True) -> bool:
            """Whether the work planned so far plus this much still fits (costs have fixed
            parts: the whole step's work is priced, not the increment); or, with
            `at_least_one` and nothing planned yet, whether it is a smallest unit (`unit`)."""
            total = cost(work.forward_tokens + forward, work.backward_tokens + backward,
                         work.backward_passes + passes)
            return total <= seconds or (at_least_one and unit and not work)

        def take_held(run: ExampleRun) -> bool:
            """Plans the backward of run's held pieces, newest first, while they fit; True if
            all did."""
            count = 0
            for piece, _, _ in reversed(run.held):
                if not fits(0, piece.length, 1):
                    break
                count += 1
                work.backward_tokens += piece.length
                work.backward_passes += 1
            if count:
                work.held_backward.append((run, count))
            return count == len(run.held)

        for run in self.runs:
            if run.planned == run.length and not take_held(run):
                return
        while work.forward_tokens < max_tokens:
            run = self._forwarding_run()
            if run is None:
                break
            remaining, rows = run.length - run.planned, max_tokens - work.forward_tokens
            backward = remaining if run.trains else 0
            # the pass's pieces share one backward
            new_pass = 0 if work.backward_now or not run.trains else 1
            whole = run.planned == 0 and not split
            # a whole example is the smallest unit only where examples are never split
            if (remaining <= rows or whole) and fits(remaining, backward, new_pass,
                                                     unit=not split):
                self._add_piece(work, run, remaining)  # the rest of it, its backward now
                if run.trains:
                    work.backward_now = True
                    work.backward_tokens += remaining
                    work.backward_passes += new_pass
                if run.held:
                    take_held(run)
                    break
                continue
            if not split or work.pieces:
                break  # a piece whose backward waits goes alone in its pass
            n = _most(min(remaining, rows), lambda k: fits(k) and cost(0, k, 1) <= seconds)
            if n < 1 and at_least_one and not work:
                n = 1
            if n >= 1:
                self._add_piece(work, run, -(-remaining // -(-remaining // n)))
            break

    def train(self, work: TrainingWork, hidden: torch.Tensor | None,
              logits: Callable[[torch.Tensor], torch.Tensor],
              rows: TrainingRows | None) -> tuple[float, int]:
        """After the step's forward pass: the losses of the forwarded pieces, from their rows'
        hidden states (R, hidden), `logits` and the pass's `rows`, then the planned backward.
        Returns (the loss whose backward ran, its tokens). FloatingPointError when the loss
        is not finite (nothing of this pass's backward ran)."""
        loss_sum, tokens = 0.0, 0
        if work.pieces:
            losses = []
            for piece, run, states in zip(work.pieces, work.runs,
                                          hidden.split([p.length for p in work.pieces])):
                loss = run.loss(logits(states), piece.start, piece.length)
                if loss is not None:
                    losses.append(loss)
            loss = torch.stack(losses).sum() if losses else None
            if loss is not None and not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}")
            if loss is not None and work.backward_now:
                rows.backward(loss)
                loss_sum += loss.item()
                tokens += sum(p.length for p, run in zip(work.pieces, work.runs) if run.trains)
            elif loss is not None:
                work.runs[0].held.append((work.pieces[0], loss, rows))
        for run, count in work.held_backward:
            for _ in range(count):
                piece, loss, piece_rows = run.held.pop()
                piece_rows.backward(loss)
                loss_sum += loss.item()
                tokens += piece.length
        self.runs = [run for run in self.runs if not run.finished]
        return loss_sum, tokens

    def _add_piece(self, work: TrainingWork, run: ExampleRun, n: int) -> None:
        """Plans the forward of run's next n tokens as a piece of this step's pass."""
        if n < run.length and run.kv is None:
            weight = self.model.model.embed_tokens.weight
            run.kv = ExampleKV(self.model.config, run.length, weight.dtype, weight.device)
        work.pieces.append(TrainingPiece(self.lora, run.planned, n, run.kv))
        work.runs.append(run)
        work.forward_tokens += n
        run.planned += n

    def _forwarding_run(self) -> ExampleRun | None:
        """The example whose forward goes on next: one under way, else the next one to start
        (None when there is none)."""
        for run in self.runs:
            if run.planned < run.length:
                return run
        run = self._next_run()
        if run is not None:
            self.runs.append(run)
        return run


def _most(limit: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [0, limit] with ok(n), for ok true up to some n and false after."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if ok(middle):
            low = middle
        else:
            high = middle - 1
    return low
