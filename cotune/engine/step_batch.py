"""The flat batch of one step's pass: the served chunks' rows, sorted by the caller, then the
training rows (pieces of examples), each row routed to its adapter's slot."""

from __future__ import annotations

import torch

from cotune.engine.example_pieces import TrainingWork
from cotune.engine.kv_cache import PagedBatch, PagedKVCache
from cotune.engine.scheduler import ScheduledChunk
from cotune.model.llama import ForwardBatch
from cotune.model.lora_routing import LoraRouting
from cotune.model.training_rows import TrainingRows


def step_batch(cache: PagedKVCache, chunks: list[ScheduledChunk],
               work: TrainingWork | None) -> ForwardBatch:
    """The batch of `chunks`' next tokens (each chunk's keys and values in `cache`), then
    `work`'s training rows where it has pieces."""
    lens = [c.num_tokens for c in chunks]
    ids = [c.seq.token_ids[c.seq.computed:c.seq.computed + c.num_tokens] for c in chunks]
    adapters = [c.seq.slot for c in chunks]
    kv = PagedBatch(cache, [c.seq.id for c in chunks], list(lens))
    training = None
    if work is not None and work.pieces:  # training rows: pieces of examples, after
        training = TrainingRows(work.pieces)
        ids += work.token_ids()
        lens += training.lengths
        adapters += [piece.lora for piece in work.pieces]
    return ForwardBatch(
        token_ids=torch.tensor([t for row_ids in ids for t in row_ids]),
        seq_lens=lens,
        kv=kv,
        lora=LoraRouting.from_sequences(lens, adapters),
        training=training,
    )
