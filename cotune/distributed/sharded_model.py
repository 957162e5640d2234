"""The base partitioned over the ranks with DeepSpeed ZeRO-3 (`deepspeed.zero.Init`), and its
forward pass that gathers each decoder layer once per pass.

At rest a rank holds 1/N of every parameter. The head (embeddings, final norm, lm_head) is
gathered once per engine step (Lockstep.begin_step), since both the embedding lookup and every
logits call of the step read it. A decoder layer is gathered for its forward over all rows of
the pass and released at once. Backward gathers each layer a second time, in reverse order,
and recomputes that layer's forward on the training rows only (layer_checkpoint: in one
process the layer's weights stay, so the training rows keep their activations instead); the
served rows and the KV cache are not touched again. Adapter slot pools,
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
from cotune.kernels.choice import backend
from cotune.model.config import ModelConfig
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.loading import check_weights, weight_files


class ShardedCausalLM(CausalLM):
    """CausalLM over ZeRO-3 partitioned parameters; build it with `load_sharded_model`."""

    recomputes_training = True

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
        return super().forward(batch)

    def layer_weights(self, index: int):
        """Decoder layer `index` gathered for the block (a collective), released after."""
        return gathered(self.layer_parameters(index))

    def before_layer_backward(self, index: int) -> None:
        if index == len(self.model.layers) - 1:  # the first layer backward meets
            self.lockstep.round(BACKWARD)

    def mirror(self, op: int) -> None:
        """Gathers and releases the layers in the order a pass of kind `op` does, computing
        nothing: how a rank with no rows of its own takes part in another rank's pass."""
        order = range(len(self.model.layers))
        for index in (order if op == FORWARD else reversed(order)):
            with gathered(self.layer_parameters(index)):
                pass


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
    # The LoRA ops' implementation, chosen once; the weights, partitioned, are never side
    # by side: each projection runs its own GEMM (no decide_fusion).
    model.use_kernels(backend(model.device))
    return model.eval()
