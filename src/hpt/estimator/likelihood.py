"""Token log-probabilities and entropy: the ``grad pi_theta`` factor of the UPGE, in code.

Two routes to the same numbers:

- from logits ``[N, T, V]`` (:func:`token_logprobs`, :func:`token_entropy`), and
- from final hidden states ``[N, T, H]`` and the output head ``[V, H]``
  (:func:`token_logprobs_and_entropy`), in chunks of tokens. Each chunk's logits are built,
  reduced to a log-probability and an entropy, and dropped; backward recomputes one chunk at a time
  and applies the closed-form gradients (:class:`_HeadChunk`), so neither pass holds a
  ``[tokens x vocab]`` float tensor of the whole batch. With V = 152k (Qwen2.5) and 8k-token
  responses that tensor alone is ~5 GB a row. Tokens that fit in one chunk keep their log-probs
  from forward to backward instead, which then skips the recomputed head matmul: the memory
  backward would have allocated for the recomputed chunk, held a little longer.

Both work in float32 whatever the model's dtype (the matmul runs in the model's dtype, or in
the ``torch.autocast`` dtype the caller runs under); float64 inputs stay float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 152k float32 logits = 0.6 GB


def _upcast(logits: Tensor) -> Tensor:
    """float32 for half / bfloat16 / float32 logits; float64 stays float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _valid_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Labels < 0 (e.g. -100, ignored positions) are gathered as 0 and reported invalid."""
    valid = labels >= 0
    return torch.where(valid, labels, 0), valid


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[label]`` per token, in float32.

    Args:
        logits: [N, T, V] (any float dtype). labels: [N, T] long; negative labels give 0.
        temperature: the sampling temperature the logits are divided by.

    Returns:
        [N, T] float32 log-probabilities.
    """
    logits = _upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    index, valid = _valid_labels(labels)
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked - torch.logsumexp(logits, dim=-1), 0.0)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per token: [N, T, V] -> [N, T] float32.

    ``H = logsumexp(z) - sum softmax(z) * z``.
    """
    logits = _upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _scaled_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float
) -> Tensor:
    """``z = (h W^T + b) / T`` [C, V] of one chunk: half-precision logits stay as they are when
    ``T == 1`` (the softmax kernels upcast as they read), else float32 (float64 stays)."""
    logits = F.linear(hidden, weight, bias)
    if temperature != 1.0:
        logits = _upcast(logits).div_(temperature)
    return logits


def _float_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-probs, entropy and log-sum-exp of one chunk of tokens: hidden [C, H] -> 3 x [C], and
    the chunk's ``log p`` [C, V] (float32; float64 stays), which backward may keep.

    ``log softmax(z)`` is one fused kernel over the logits ``z = (h W^T + b) / T``, in float32
    (float64 stays); the entropy's ``p = exp(log p)`` is written into the logits' buffer, dead by
    then, and ``-sum p log p`` is reduced in place: two ``[C, V]`` buffers a chunk, not four
    (each fresh one of SmolLM2's 1024 x 49k float32 chunks is 200 MB the CPU faults in again).
    The log-sum-exp ``z[label] - log p[label]`` lets backward rebuild ``log p`` from ``z`` in place.
    """
    logits = _scaled_logits(hidden, weight, bias, temperature)
    dtype = _float_dtype(logits)
    logp = torch.log_softmax(logits, dim=-1, dtype=dtype)
    index, valid = _valid_labels(labels)
    picked = logp.gather(-1, index[:, None]).squeeze(-1)
    lse = logits.gather(-1, index[:, None]).squeeze(-1).to(dtype) - picked
    logprobs = torch.where(valid, picked, 0.0)
    if not with_entropy:
        return logprobs, torch.zeros_like(logprobs), lse, logp
    probs = torch.exp(logp, out=logits) if logits.dtype == dtype else logp.exp()
    return logprobs, -probs.mul_(logp).sum(-1), lse, logp  # -sum p log p


def _row_grad(grad: Tensor | None, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """The [C, 1] gradient of each token's log-prob (0 at ignored labels, or when unused)."""
    if grad is None:
        return torch.zeros(valid.shape[0], 1, dtype=dtype, device=valid.device)
    return torch.where(valid, grad, 0.0).to(dtype)[:, None]


class _HeadChunk(torch.autograd.Function):
    """:func:`_chunk` with a hand-written backward.

    Backward recomputes the chunk's logits (one matmul, as activation checkpointing would) and
    applies the closed forms ``d logprob / dz = onehot(label) - p`` and
    ``dH / dz = -p (log p + H)``, then ``/ T`` and the head's matmuls: a few in-place passes over
    one [C, V] buffer, instead of autograd's graph of log-sum-exp, softmax, product and sum and
    their saved [C, V] intermediates. Forward saves only the chunk's inputs, its entropy and
    its log-sum-exp ([C] each), and, with ``keep``, its ``log p`` [C, V]: backward then uses it
    (once; a second backward recomputes) instead of recomputing the logits.
    Under ``torch.autocast`` backward runs under the same autocast state as forward (autograd
    runs backward outside it), so its matmuls use the forward's dtype too.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy, keep):  # type: ignore[override]
        logprobs, entropy, lse, logp = _chunk(
            hidden, weight, bias, labels, temperature, with_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, labels, entropy, lse)
        # an intermediate, not an input or output: held on ctx and dropped by the backward using it
        ctx.logp = logp if keep else None
        ctx.set_materialize_grads(False)  # an output the loss does not use has no gradient
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        device = hidden.device.type
        ctx.autocast = (
            (device, torch.get_autocast_dtype(device))
            if torch.is_autocast_enabled(device)
            else None
        )
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):  # type: ignore[override]
        if ctx.autocast is None:
            return _HeadChunk._backward(ctx, grad_logprobs, grad_entropy)
        device, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype):
            grads = _HeadChunk._backward(ctx, grad_logprobs, grad_entropy)
        hidden, weight, bias = ctx.saved_tensors[:3]
        return tuple(  # autocast matmuls return its dtype; each gradient takes its input's
            g.to(x.dtype) if g is not None else None
            for g, x in zip(grads, (hidden, weight, bias, None, None, None, None))
        )

    @staticmethod
    def _backward(ctx, grad_logprobs, grad_entropy):  # type: ignore[no-untyped-def]
        # dz = (onehot(label) g_lp - p (g_lp + g_H (log p + H))) / T, the [C, 1] factors folded
        # so that each [C, V] pass is one kernel; log p = z - lse is rebuilt in the recomputed
        # logits' own buffer (float32 logits; half ones under autocast are upcast into one copy),
        # and an unused entropy (None: gradients are not materialised) needs only p = exp(log p),
        # in place: one [C, V] buffer, two with the entropy's gradient
        hidden, weight, bias, labels, entropy, lse = ctx.saved_tensors
        kept, ctx.logp = ctx.logp, None
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        index, valid = _valid_labels(labels)
        inv_t = 1.0 / ctx.temperature
        if kept is not None:  # forward's log p, written over in place below (no one else holds it)
            logp, dtype = kept, kept.dtype
        else:
            logits = _scaled_logits(hidden, weight, bias, ctx.temperature)
            dtype = _float_dtype(logits)
            logp = (logits if logits.dtype == dtype else logits.to(dtype)).sub_(lse[:, None])
        g_lp = _row_grad(grad_logprobs, valid, dtype)
        if ctx.with_entropy and grad_entropy is not None:
            g_h = grad_entropy.to(dtype)[:, None]
            probs = logp.exp()
            offset = (g_lp + g_h * entropy.to(dtype)[:, None]).mul_(-inv_t)
            coef = logp.mul_(g_h * -inv_t).add_(offset)  # -(g_lp + g_H (log p + H)) / T
            grad_z = probs.mul_(coef)
        else:
            grad_z = logp.exp_().mul_(g_lp * -inv_t)  # p, in place
        grad_z = grad_z.scatter_add_(-1, index[:, None], g_lp * inv_t).to(weight.dtype)
        grad_hidden = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_z.T @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad_z.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def token_logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    keep: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token log-probs and entropies from final hidden states and the output head, in chunks.

    Equal in value and gradient to ``token_logprobs(hidden @ W.T, labels)`` and
    ``token_entropy(hidden @ W.T)``. Where all the tokens fit in one chunk, forward keeps their
    log-probs ``[N*T, V]`` for backward (which would otherwise allocate as much to recompute them);
    else only each chunk's inputs are saved and backward recomputes its logits, one chunk at a time,
    so no ``[N*T, V]`` tensor of more than one chunk is ever held.

    Args:
        hidden: [N, T, H] final hidden states (after the final norm), aligned with ``labels``.
        lm_head_weight: [V, H] output embedding. labels: [N, T] long, negative = ignored (0).
        chunk_size: tokens per chunk. bias: optional [V] head bias.
        temperature: sampling temperature the logits are divided by.
        with_entropy: also return the entropy (False: None, and a cheaper pass).
        keep: keep each chunk's log-probs for backward (True), recompute them there (False);
            None: keep when the tokens fit in one chunk.

    Returns:
        (logprobs [N, T] float32, entropy [N, T] float32 or None).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad
        or lm_head_weight.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if keep is None:
        keep = flat_labels.shape[0] <= chunk_size
    logprobs, entropies = [], []
    for start in range(0, flat_labels.shape[0], chunk_size):
        piece = (
            flat_hidden[start : start + chunk_size],
            lm_head_weight,
            bias,
            flat_labels[start : start + chunk_size],
            temperature,
            with_entropy,
        )
        if needs_grad:
            lp, ent = _HeadChunk.apply(*piece, keep)
        else:
            lp, ent, _, _ = _chunk(*piece)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = flat_hidden.new_zeros(shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    out_logprobs = torch.cat(logprobs).reshape(shape)
    return out_logprobs, (torch.cat(entropies).reshape(shape) if with_entropy else None)
