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

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

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


class HeadBuffers:
    """``[tokens, vocab]`` float buffers that the head's chunks reuse on a CPU.

    On a CPU every fresh buffer this large (200 MB for 1024 tokens of a 49k vocabulary) is mapped
    from the kernel by glibc and faulted in page by page when first written. Measured inside
    ``hpt train`` on SmolLM2 (2 passes of 1024 tokens an update), the second pass's head matmul took
    0.56-0.62 s and its log-softmax 0.40 s into fresh buffers, against 0.19 s and 0.05 s in the first
    pass. Reused buffers are already faulted in. CUDA's caching allocator reuses memory itself, so
    only CPU float32 / float64 buffers come from here, and only outside autocast.

    Buffers are reused only inside :func:`reusing_head_buffers` (the trainer's update and its
    no-grad log-prob passes), which drops the free ones when it ends; elsewhere every chunk
    allocates its own, as before. :meth:`take` hands out a buffer (a free one large enough, else a
    new one), :meth:`give` takes it back (a tensor that is not one of its buffers is ignored, and a
    buffer never given back is freed by Python as usual).
    """

    def __init__(self, max_free: int = 3) -> None:
        self.max_free = max_free
        self.active = 0  # nesting depth of reusing_head_buffers
        self.taken = self.allocated = 0  # buffers handed out, and of those newly allocated
        self._free: list[Tensor] = []
        # id -> buffer, weakly: a buffer never given back is freed, and its entry goes with it
        self._mine: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def usable(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            self.active > 0
            and device.type == "cpu"
            and dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
        )

    def take(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        """A ``[rows, cols]`` CPU tensor of ``dtype``, uninitialised: the smallest free buffer
        large enough, else a new one a quarter larger (passes differ a little in tokens), which
        replaces the largest free one too small."""
        size = rows * cols
        with self._lock:
            self.taken += 1
            fits = [i for i, b in enumerate(self._free) if b.dtype == dtype and b.numel() >= size]
            if fits:
                base = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                return base[:size].view(rows, cols)
            small = [i for i, b in enumerate(self._free) if b.dtype == dtype]
            if small:
                del self._free[max(small, key=lambda i: self._free[i].numel())]
            base = torch.empty(size + size // 4, dtype=dtype)
            self.allocated += 1
            self._mine[id(base)] = base
        return base[:size].view(rows, cols)

    def give(self, tensor: Tensor | None) -> None:
        """Take back a buffer from :meth:`take` (anything else is ignored; outside
        :func:`reusing_head_buffers`, e.g. a backward run after the block, it is freed)."""
        base = getattr(tensor, "_base", None)
        with self._lock:
            if base is None or self.active == 0 or self._mine.get(id(base)) is not base:
                return
            if any(b is base for b in self._free):
                return
            self._free.append(base)
            if len(self._free) > self.max_free:
                smallest = min(range(len(self._free)), key=lambda i: self._free[i].numel())
                del self._free[smallest]

    def enter(self) -> None:
        with self._lock:
            self.active += 1

    def exit(self) -> None:
        """Leave one :func:`reusing_head_buffers` block; the outermost drops the free buffers."""
        with self._lock:
            self.active -= 1
            if self.active == 0:
                self._free.clear()


HEAD_BUFFERS = HeadBuffers()


@contextmanager
def reusing_head_buffers() -> Iterator[None]:
    """Within this block the head's CPU chunks reuse their ``[tokens, vocab]`` buffers
    (:class:`HeadBuffers`); the free ones are dropped when the outermost block ends."""
    HEAD_BUFFERS.enter()
    try:
        yield
    finally:
        HEAD_BUFFERS.exit()


def _scaled_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, pooled: bool = False
) -> Tensor:
    """``z = (h W^T + b) / T`` [C, V] of one chunk: half-precision logits stay as they are when
    ``T == 1`` (the softmax kernels upcast as they read), else float32 (float64 stays).
    ``pooled``: written into a buffer of :data:`HEAD_BUFFERS` (float32 / float64 CPU operands)."""
    if pooled:
        out = HEAD_BUFFERS.take(hidden.shape[0], weight.shape[0], hidden.dtype)
        if bias is None:
            logits = torch.mm(hidden, weight.t(), out=out)
        else:
            logits = torch.addmm(bias, hidden, weight.t(), out=out)
    else:
        logits = F.linear(hidden, weight, bias)
    if temperature != 1.0:
        logits = _upcast(logits).div_(temperature)
    return logits


def _pooled(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a chunk's [C, V] buffers come from :data:`HEAD_BUFFERS`."""
    return (
        HEAD_BUFFERS.usable(hidden.device, hidden.dtype)
        and weight.dtype == hidden.dtype
        and (bias is None or bias.dtype == hidden.dtype)
    )


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
    On a CPU both buffers come from :data:`HEAD_BUFFERS`; the logits' goes back before returning,
    ``log p``'s is the caller's to give back (or to keep for backward).
    """
    pooled = _pooled(hidden, weight, bias)
    logits = _scaled_logits(hidden, weight, bias, temperature, pooled)
    dtype = _float_dtype(logits)
    if pooled:
        out = HEAD_BUFFERS.take(logits.shape[0], logits.shape[1], dtype)
        logp = torch.log_softmax(logits, dim=-1, out=out)
    else:
        logp = torch.log_softmax(logits, dim=-1, dtype=dtype)
    index, valid = _valid_labels(labels)
    picked = logp.gather(-1, index[:, None]).squeeze(-1)
    lse = logits.gather(-1, index[:, None]).squeeze(-1).to(dtype) - picked
    logprobs = torch.where(valid, picked, 0.0)
    if not with_entropy:
        HEAD_BUFFERS.give(logits)
        return logprobs, torch.zeros_like(logprobs), lse, logp
    probs = torch.exp(logp, out=logits) if logits.dtype == dtype else logp.exp()
    entropy = -probs.mul_(logp).sum(-1)  # -sum p log p
    HEAD_BUFFERS.give(logits)
    return logprobs, entropy, lse, logp


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
        if not keep:
            HEAD_BUFFERS.give(logp)
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
        pooled = _pooled(hidden, weight, bias)
        if kept is not None:  # forward's log p, written over in place below (no one else holds it)
            logp, dtype = kept, kept.dtype
        else:
            logits = _scaled_logits(hidden, weight, bias, ctx.temperature, pooled)
            dtype = _float_dtype(logits)
            logp = (logits if logits.dtype == dtype else logits.to(dtype)).sub_(lse[:, None])
        g_lp = _row_grad(grad_logprobs, valid, dtype)
        probs = None
        if ctx.with_entropy and grad_entropy is not None:
            g_h = grad_entropy.to(dtype)[:, None]
            if pooled:
                probs = torch.exp(logp, out=HEAD_BUFFERS.take(logp.shape[0], logp.shape[1], dtype))
            else:
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
        HEAD_BUFFERS.give(logp)
        HEAD_BUFFERS.give(probs)
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
            lp, ent, _, logp = _chunk(*piece)
            HEAD_BUFFERS.give(logp)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = flat_hidden.new_zeros(shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    out_logprobs = torch.cat(logprobs).reshape(shape)
    return out_logprobs, (torch.cat(entropies).reshape(shape) if with_entropy else None)
