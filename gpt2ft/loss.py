"""The language-model loss without the full logits: next-token cross-entropy from GPT-2's last hidden states, a
chunk of positions at a time. Training (`use_chunked_loss`, set up by training.build_trainer) and evaluation
(`evaluation.batch_nll`) both score through `token_nll_sum`.

GPT-2's own forward computes the logits of every position (rows x width x 50,257) before its loss; the loss then
makes an fp32 copy of them, and accelerate's mixed-precision wrapper another: about 0.4 GB each for a 2,048-token
batch, and more than the whole model's activations. Here the logits exist one chunk at a time, and the gradients
with respect to the hidden states and the output embedding are computed in the same pass (as Liger-Kernel's fused
linear cross-entropy does), so nothing of the vocabulary's width is kept for the backward pass and no matrix
product is computed twice.

The sum is over every position, the ignored ones weighted by zero, rather than over the labelled positions picked
out by a boolean index: picking them out needs their count on the host, which waits for the GPU every step.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from .data import IGNORE_INDEX

# Positions a chunk: 1,024 x 50,257 fp32 logits are 206 MB, against 0.4-1.2 GB for a batch's full logits.
LOSS_CHUNK = 1024


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of each position: the next position's label (-100 after the last), as transformers' causal-LM
    loss has it. Labels are the tokens themselves; the model predicts each from the tokens before it."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the output embedding's matmul runs in: autocast's when it is on (bf16/fp16), else the weights'."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    dtype: torch.dtype,
    want_hidden: bool,
    want_weight: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum of token NLLs over `targets` (-100 ignored) and, when asked, its gradients with respect to `hidden` and
    `weight`, times `grad_scale`: d(sum)/d(logits) = softmax - one_hot, times 0 at ignored positions. The matrix
    products run in `dtype`, the softmax in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        head = weight.to(dtype)
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            inputs = hidden[part].to(dtype)
            logits = (inputs @ head.T).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[part, None]).squeeze(1)
            keep = valid[part]
            total = total + torch.where(keep, log_norm - picked, 0.0).sum()
            if want_hidden or want_weight:
                grad = logits.sub_(log_norm[:, None]).exp_()  # softmax, in the logits' memory
                grad.scatter_add_(1, safe[part, None], torch.full_like(picked[:, None], -1.0))
                grad = grad.mul_(keep[:, None] if grad_scale is None else keep[:, None] * grad_scale).to(dtype)
                if want_hidden:
                    grad_hidden[part] = grad @ head
                if want_weight:
                    grad_weight += (grad.T @ inputs).float()
    return total, grad_hidden, grad_weight


class LinearCrossEntropy(torch.autograd.Function):
    """sum of NLL(hidden @ weight.T, targets), a chunk of positions at a time.

    In fp32 and bf16 the gradients are computed in the forward pass (no matrix product twice). In fp16 they wait for
    the backward pass, which recomputes each chunk's logits: there the gradient arrives multiplied by the loss
    scaler's scale, as the model's own loss would give it, so the fp16 products keep their range and the scaler
    its control (a gradient made unscaled in the forward pass could overflow or vanish in fp16 where the scaler can
    do nothing about it). One more output-embedding product is the price, in fp16 only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # type: ignore[override]
        dtype = _compute_dtype(hidden.device.type, weight.dtype)
        ctx.dtype, ctx.chunk, ctx.weight_dtype = dtype, chunk, weight.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.deferred = dtype == torch.float16
        if ctx.deferred:
            ctx.save_for_backward(hidden, weight, targets)
            return _chunked_pass(hidden, weight, targets, chunk, dtype, False, False)[0]
        total, grad_hidden, grad_weight = _chunked_pass(hidden, weight, targets, chunk, dtype, want_hidden, want_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        if ctx.deferred:
            hidden, weight, targets = ctx.saved_tensors
            _, grad_hidden, grad_weight = _chunked_pass(
                hidden,
                weight,
                targets,
                ctx.chunk,
                ctx.dtype,
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[1],
                grad_scale=grad_total.float(),
            )
            return grad_hidden, grad_weight.to(ctx.weight_dtype) if grad_weight is not None else None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )


def token_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLLs of a batch from the last hidden states (rows, width, n_embd) and the output
    embedding, and how many positions have a target; both stay on the device.

    Differentiable when gradients are enabled; under no_grad only the sum is computed.
    """
    chunk = chunk or LOSS_CHUNK
    targets = shifted_targets(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad):
        total = LinearCrossEntropy.apply(flat, weight, targets, chunk)
    else:
        total = _chunked_pass(
            flat, weight, targets, chunk, _compute_dtype(flat.device.type, weight.dtype), False, False
        )[0]
    return total, (targets != IGNORE_INDEX).sum()


def core_model(model: Any) -> Any:
    """The GPT2LMHeadModel inside a torch.compile or PEFT wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_hidden_states(core: Any, **inputs: Any) -> torch.Tensor:
    """The last hidden states of a causal LM's decoder (its `base_model`: GPT-2's `transformer`, Llama's `model`),
    without the output layer, with no KV cache."""
    return core.base_model(**inputs, use_cache=False).last_hidden_state


def chunked_loss_forward(
    self: Any,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    labels=None,
    num_items_in_batch=None,
    **kwargs: Any,
) -> Any:
    """A causal LM's forward for training: with labels, the loss from `token_nll_sum` and no logits; without,
    the model's own forward. The loss is the mean over `num_items_in_batch` targets when the Trainer gives it (the
    whole optimiser step's count, as transformers' own loss), else over this batch's."""
    if labels is None:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
    kwargs.pop("use_cache", None)
    hidden = last_hidden_states(
        self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
    )
    total, count = token_nll_sum(hidden, self.get_output_embeddings().weight, labels)
    if num_items_in_batch is None:
        num_items_in_batch = count.clamp(min=1)
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return CausalLMOutputWithCrossAttentions(loss=total / num_items_in_batch)


def use_chunked_loss(model: Any) -> Any:
    """Give this model instance `chunked_loss_forward` (the class and the saved folder are untouched: a loaded
    model is a plain transformers model). Call it before the Trainer wraps the model for mixed precision, so the
    autocast wrapper wraps this forward."""
    core = core_model(model)
    if core.get_output_embeddings() is None or core.base_model is core:
        raise TypeError(f"chunked loss: {type(core).__name__} is not a causal language model with an output layer")
    core.forward = types.MethodType(chunked_loss_forward, core)
    return model
