"""The base partitioned over the ranks with DeepSpeed ZeRO-3 (`deepspeed.zero.Init`), and its
forward pass that gathers each decoder layer once per pass.

At rest a rank holds 1/N of every parameter. The head (embeddings, final norm, lm_head) is
gathered once per engine step (Lockstep.begin_step), since both the embedding lookup and every
logits call of the step read it. A decoder layer is gathered for its forward over all rows of
the pass and released at once. Backward gathers each layer a second time, in reverse order,
and recomputes that layer's forward on the training rows only (like activation
checkpointing); the served rows and the KV cache are not touched again. Adapter slot pools,
KV caches, LoRA weights being trained and their optimizer states are ordinary tensors: they
stay on their rank.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open

from cotune.distributed.lockstep import BACKWARD, FORWARD, Lockstep
from cotune.model.config import ModelConfig
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.loading import check_weights, weight_files
from cotune.model.lora_routing import LoraRouting
from cotune.model.rope import rotary_cos_sin


class ShardedCausalLM(CausalLM):
    """CausalLM over ZeRO-3 partitioned parameters; build it with `load_sharded_model`."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lockstep = Lockstep(self.mirror, lambda: gathered(self.head_parameters()))

    def head_parameters(self) -> list[torch.nn.Parameter]:
        head = [self.model.embed_tokens.weight, self.model.norm.weight]
        return head + ([] if self.lm_head is None else [self.lm_head.weight])

    def layer_parameters(self, index: int) -> list[torch.nn.Parameter]:
        return list(self.model.layers[index].parameters())

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """(T, hidden_size) final hidden states; one round of the ranks' lockstep."""
        self.lockstep.round(FORWARD)
        x = self.model.embed_tokens(batch.token_ids.to(self.device))
        positions = batch.positions().to(self.device)
        cos, sin = rotary_cos_sin(self._frequencies(), positions, x.dtype)
        trainables = [] if batch.lora is None else batch.lora.trainables
        lora_params = [p for t in trainables for p in t.parameters()] \
            if torch.is_grad_enabled() else []
        training = _training_rows(batch) if lora_params else None
        for index in range(len(self.model.layers)):
            x = _GatheredLayer.apply(x, (self, index, batch, cos, sin, training), *lora_params)
        return self.model.norm(x)

    def mirror(self, op: int) -> None:
        """Gathers and releases the layers in the order a pass of kind `op` does, computing
        nothing: how a rank with no rows of its own takes part in another rank's pass."""
        order = range(len(self.model.layers))
        for index in (order if op == FORWARD else reversed(order)):
            with gathered(self.layer_parameters(index)):
                pass


class _GatheredLayer(torch.autograd.Function):
    """y = layer(x) with the layer's parameters gathered for the call and released after.

    Backward recomputes the layer on the training rows R with the parameters gathered again:
    dx[R], dA, dB = vjp(layer restricted to R, dy[R]); dx = 0 on every other row, since
    served rows and training rows never attend to each other. The LoRA parameters are inputs
    only so that autograd reaches this node; their gradients accumulate in their .grad by the
    inner backward, as in reentrant activation checkpointing."""

    @staticmethod
    def forward(ctx, x, context, *lora_params):
        model, index, batch, cos, sin, training = context
        ctx.context, ctx.lora_params = context, lora_params
        if training is not None:
            ctx.save_for_backward(x[training[0]])  # the training rows' input: all backward needs
            # dropout masks are drawn again in the recomputation: from the same states
            ctx.rng = [t.generator.get_state() for t in batch.lora.trainables
                       if t.generator is not None]
        with gathered(model.layer_parameters(index)):
            return model.model.layers[index](x, cos, sin, batch)

    @staticmethod
    def backward(ctx, grad):
        model, index, batch, cos, sin, (rows, sub) = ctx.context
        if index == len(model.model.layers) - 1:  # the first layer backward meets
            model.lockstep.round(BACKWARD)
        (x_rows,) = ctx.saved_tensors
        generators = [t.generator for t in batch.lora.trainables if t.generator is not None]
        now = [g.get_state() for g in generators]
        for generator, state in zip(generators, ctx.rng):
            generator.set_state(state)
        with gathered(model.layer_parameters(index)), torch.enable_grad():
            xr = x_rows.detach().requires_grad_()
            y = model.model.layers[index](xr, cos[rows], sin[rows], sub)
            torch.autograd.backward(y, grad[rows], inputs=[xr, *ctx.lora_params])
        for generator, state in zip(generators, now):
            generator.set_state(state)
        dx = grad.new_zeros(grad.shape)
        dx[rows] = xr.grad
        return dx, None, *([None] * len(ctx.lora_params))


def _training_rows(batch: ForwardBatch) -> tuple[torch.Tensor, ForwardBatch]:
    """(the rows of the sequences being trained, those sequences alone as a batch without
    the KV cache: training rows never enter it)."""
    lora, row, segment = batch.lora, 0, 0
    rows, lens, adapters = [], [], []
    for n in batch.seq_lens:
        while lora.seg_starts[segment + 1] <= row:
            segment += 1
        index = lora.seg_trainables[segment]
        if index >= 0:
            rows.append(torch.arange(row, row + n))
            lens.append(n)
            adapters.append(lora.trainables[index])
        row += n
    rows = torch.cat(rows)
    return rows, ForwardBatch(batch.token_ids[rows], lens, kv=None,
                              lora=LoraRouting.from_sequences(lens, adapters))


@contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """The whole of `params` on this rank within the block (a collective: every rank enters
    it with the same parameters in the same order)."""
    with deepspeed.zero.GatheredParameters(params):
        yield


def load_sharded_model(path: str | Path, zero_config: dict) -> ShardedCausalLM:
    """The base of checkpoint directory `path` partitioned over the ranks as it is built;
    rank 0 reads each weight from safetensors (one tensor at a time) and DeepSpeed broadcasts
    it into every rank's partition. The dtype is the config's (zero_config.zero3_config).
    Needs the process group (ranks.init_ranks)."""
    path = Path(path)
    config = ModelConfig.from_dir(path)
    # mem_efficient_linear=False: DeepSpeed would otherwise replace F.linear process-wide
    with deepspeed.zero.Init(config_dict_or_path=zero_config, mem_efficient_linear=False):
        model = ShardedCausalLM(config)
    params = dict(model.named_parameters())
    found, files = {}, {}
    for file in weight_files(path):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                found[name], files[name] = torch.Size(f.get_slice(name).get_shape()), file
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    check_weights(path, config, found, {n: p.ds_shape for n, p in params.items()})
    with ExitStack() as stack:
        readers = {file: stack.enter_context(safe_open(file, "pt")) for file in set(files.values())}
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.get_rank() == 0:
                    param.data.copy_(readers[files[name]].get_tensor(name))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
