"""A decoder layer in a forward pass that trains: every row computed at once, autograd state
kept for the training rows alone."""

from __future__ import annotations

import torch


class CheckpointedLayer(torch.autograd.Function):
    """y = layer(x) over every row of the pass, keeping no autograd state but the training
    rows' input x[R] (R: the rows from batch.first_training_row on). For a base whose
    weights are released after the forward (sharded): backward gathers them again.

    Backward recomputes the layer on R alone, with autograd on:
        dx[R], dA, dB, d(earlier pieces' k, v) = vjp(layer on R; dy[R], d(own k, v))
    where d(own k, v) is what later pieces of the same examples sent (training_rows), and
    dx = 0 on every other row: served rows and training rows never attend to each other.
    So served rows keep no activations and cost no backward work. The LoRA parameters are
    inputs only so that autograd reaches this node; the inner backward accumulates their
    gradients in .grad (as reentrant activation checkpointing does). LoRA dropout draws the
    same masks again from the generators' states at forward time.

    `context` = (model, index, batch, cos, sin); the model provides `layer_weights(index)`
    (a context holding the layer's weights, gathered where they are sharded) and
    `before_layer_backward(index)`."""

    @staticmethod
    def forward(ctx, x, context, *lora_params):
        model, index, batch, cos, sin = context
        ctx.context, ctx.lora_params = context, lora_params
        ctx.save_for_backward(x[batch.first_training_row:])  # all that backward needs
        ctx.rng = [g.get_state() for g in _generators(batch)]
        with model.layer_weights(index):
            return model.model.layers[index](x, cos, sin, batch)

    @staticmethod
    def backward(ctx, grad):
        model, index, batch, cos, sin = ctx.context
        model.before_layer_backward(index)
        (x_rows,) = ctx.saved_tensors
        first = batch.first_training_row
        sub = batch.training_only(batch.training.recomputation())
        generators = _generators(batch)
        now = [g.get_state() for g in generators]
        for generator, state in zip(generators, ctx.rng):
            generator.set_state(state)
        with model.layer_weights(index), torch.enable_grad():
            xr = x_rows.detach().requires_grad_()
            y = model.model.layers[index](xr, cos[first:], sin[first:], sub)
            rows = sub.training
            torch.autograd.backward([y, *rows.outputs], [grad[first:], *rows.output_grads],
                                    inputs=[xr, *ctx.lora_params, *rows.leaf_tensors()])
        rows.send_gradients()
        for generator, state in zip(generators, now):
            generator.set_state(state)
        dx = grad.new_zeros(grad.shape)
        dx[first:] = xr.grad
        return dx, None, *([None] * len(ctx.lora_params))


def _generators(batch) -> list[torch.Generator]:
    """The dropout generators of the adapters trained in the pass, each once."""
    found = []
    for piece in batch.training.pieces:
        generator = piece.lora.generator
        if generator is not None and not any(generator is g for g in found):
            found.append(generator)
    return found
