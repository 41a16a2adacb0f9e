"""Token log-probs and entropy: chunked from hidden states equals the plain computation."""

from __future__ import annotations

import pytest
import torch

from hpt.estimator import likelihood
from hpt.estimator.likelihood import token_entropy, token_logprobs, token_logprobs_and_entropy

# backward from the log-probs kept by forward, or from logits recomputed chunk by chunk
KEEP = [True, False]


def _inputs(seed=0, n=3, t=7, h=16, v=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, -2:] = -100  # ignored positions
    return hidden, weight, labels


def test_plain_matches_log_softmax_and_entropy_definition():
    _, _, labels = _inputs()
    logits = torch.randn(3, 7, 50, dtype=torch.float64)
    lp = token_logprobs(logits, labels)
    full = torch.log_softmax(logits, -1)
    valid = labels >= 0
    torch.testing.assert_close(
        lp[valid], full.gather(-1, labels.clamp_min(0)[..., None])[..., 0][valid]
    )
    assert torch.all(lp[~valid] == 0)
    p = full.exp()
    torch.testing.assert_close(token_entropy(logits), -(p * full).sum(-1))
    torch.testing.assert_close(
        token_logprobs(logits, labels, temperature=0.5), token_logprobs(logits * 2, labels)
    )


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_plain_in_values_and_gradients(chunk_size, temperature, keep):
    hidden, weight, labels = _inputs()
    lp_c, ent_c = token_logprobs_and_entropy(
        hidden, weight, labels, chunk_size, temperature=temperature, keep=keep
    )
    probe_a, probe_b = (
        torch.randn(3, 7, dtype=torch.float64),
        torch.randn(3, 7, dtype=torch.float64),
    )
    g_chunked = torch.autograd.grad((lp_c * probe_a + ent_c * probe_b).sum(), (hidden, weight))
    logits = hidden @ weight.T
    lp_p = token_logprobs(logits, labels, temperature)
    ent_p = token_entropy(logits, temperature)
    g_plain = torch.autograd.grad((lp_p * probe_a + ent_p * probe_b).sum(), (hidden, weight))
    torch.testing.assert_close(lp_c, lp_p)
    torch.testing.assert_close(ent_c, ent_p)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)


def test_chunks_never_save_or_hold_the_whole_logits():
    """Past one chunk autograd saves only chunk inputs, and nothing holds N*T*V elements."""
    hidden, weight, labels = _inputs(n=4, t=16, v=64, dtype=torch.float32)
    whole = 4 * 16 * 64
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = token_logprobs_and_entropy(hidden, weight, labels, chunk_size=8)
    assert max(saved) <= max(weight.numel(), 8 * 64)  # the head's weight, or one chunk's worth
    assert max(saved) < whole
    assert all(node.logp is None for node in _head_nodes(lp))
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # plain logits for contrast: the hook sees the full [N, T, V] tensor
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden @ weight.T, labels)
    assert max(saved) >= whole


def _head_nodes(out):
    """The chunked head's autograd nodes behind ``out`` (through the concatenation)."""
    nodes = [out.grad_fn]
    found = []
    while nodes:
        node = nodes.pop()
        if node is None:
            continue
        if type(node).__name__ == "_HeadChunkBackward":
            found.append(node)
            continue
        nodes.extend(n for n, _ in node.next_functions)
    return found


@pytest.mark.parametrize("entropy_in_loss", [False, True])
def test_kept_logprobs_spare_the_recomputed_logits_once(monkeypatch, entropy_in_loss):
    """With keep, forward keeps each chunk's log p and the first backward builds no logits; a
    second backward through the same graph (retain_graph) recomputes them, with equal gradients."""
    hidden, weight, labels = _inputs(n=4, t=16, v=64, dtype=torch.float64)
    calls = []
    real = likelihood._scaled_logits
    monkeypatch.setattr(
        likelihood, "_scaled_logits", lambda *a: calls.append(a[0].shape[0]) or real(*a)
    )
    lp, ent = token_logprobs_and_entropy(
        hidden, weight, labels, chunk_size=24, temperature=0.8, keep=True
    )
    assert calls == [24, 24, 16]  # forward's three chunks
    nodes = _head_nodes(lp)
    assert len(nodes) == 3 and all(node.logp is not None for node in nodes)
    loss = (lp * torch.linspace(-1, 1, 16)).sum() + (ent.sum() if entropy_in_loss else 0.0)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    assert calls == [24, 24, 16]  # no logits rebuilt
    assert all(node.logp is None for node in nodes)  # dropped once used
    second = torch.autograd.grad(loss, (hidden, weight))
    assert sorted(calls) == [16, 16, 24, 24, 24, 24]  # recomputed
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    # by default only tokens that fit in one chunk are kept: 64 tokens in chunks of 24, 64, 100
    for chunk, kept in ((24, False), (64, True), (100, True)):
        lp, _ = token_logprobs_and_entropy(hidden, weight, labels, chunk)
        assert [node.logp is not None for node in _head_nodes(lp)] == [kept] * -(-64 // chunk)


def test_bf16_model_no_grad_and_without_entropy():
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        lp, ent = token_logprobs_and_entropy(hidden, weight, labels, 4)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    lp2, none = token_logprobs_and_entropy(
        hidden.detach(), weight.detach(), labels, 4, with_entropy=False
    )
    assert none is None
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(
        lp, token_logprobs(hidden.detach() @ weight.detach().T, labels), atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("with_bias", [False, True])
def test_hand_written_backward_passes_gradcheck(with_bias, keep):
    """The closed-form backward against finite differences (float64), bias and temperature too."""
    hidden, weight, labels = _inputs(n=2, t=3, h=5, v=7)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True) if with_bias else None

    def both(h, w, b):
        lp, ent = token_logprobs_and_entropy(h, w, labels, 4, bias=b, temperature=0.8, keep=keep)
        return lp, ent

    # gradcheck runs backward repeatedly on one graph: the first from the kept log p, the rest
    # recomputed, equal up to float64 rounding
    nondet = 1e-12 if keep else 0.0
    assert torch.autograd.gradcheck(both, (hidden, weight, bias), nondet_tol=nondet)

    def lp_only(h, w, b):
        return token_logprobs_and_entropy(h, w, labels, 4, bias=b, with_entropy=False, keep=keep)[0]

    assert torch.autograd.gradcheck(lp_only, (hidden, weight, bias), nondet_tol=nondet)


@pytest.mark.parametrize("keep", KEEP)
def test_autocast_backward_runs_in_the_forward_dtype(keep):
    """Under torch.autocast (bf16) the chunked head equals autograd through the plain formula
    under the same autocast: its backward matmuls run in bf16 too (autograd runs a Function's
    backward outside autocast), and every gradient keeps its input's float32 dtype."""
    hidden, weight, labels = _inputs(n=4, t=8, h=32, v=96, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)  # fixed probes: the comparison below is of one draw
    probe_a, probe_b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_c, ent_c = token_logprobs_and_entropy(
            hidden, weight, labels, 5, temperature=0.9, keep=keep
        )
        logits = hidden @ weight.T
        assert logits.dtype == torch.bfloat16
        lp_p = token_logprobs(logits, labels, 0.9)
        ent_p = token_entropy(logits, 0.9)
    assert lp_c.dtype == torch.float32 and ent_c.dtype == torch.float32
    g_chunked = torch.autograd.grad((lp_c * probe_a + ent_c * probe_b).sum(), (hidden, weight))
    g_plain = torch.autograd.grad((lp_p * probe_a + ent_p * probe_b).sum(), (hidden, weight))
    torch.testing.assert_close(lp_c, lp_p)
    torch.testing.assert_close(ent_c, ent_p)
    lp_32, ent_32 = token_logprobs_and_entropy(hidden, weight, labels, 5, temperature=0.9)
    g_32 = torch.autograd.grad((lp_32 * probe_a + ent_32 * probe_b).sum(), (hidden, weight))
    for a, b, c in zip(g_chunked, g_plain, g_32):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        # bf16 matmuls, not float32 ones: nearer the autocast reference than the float32 path is
        assert (a - b).abs().max() < (c - b).abs().max()


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradient_when_the_loss_leaves_the_entropy_out(temperature, keep):
    """Entropy computed but unused by the loss (GRPO: no entropy bonus): backward takes the
    softmax-only path, and the gradients still equal autograd through the plain formula."""
    hidden, weight, labels = _inputs()
    lp_c, ent_c = token_logprobs_and_entropy(
        hidden, weight, labels, 4, temperature=temperature, keep=keep
    )
    probe = torch.randn(3, 7, dtype=torch.float64)
    g_chunked = torch.autograd.grad((lp_c * probe).sum(), (hidden, weight))
    lp_p = token_logprobs(hidden @ weight.T, labels, temperature)
    g_plain = torch.autograd.grad((lp_p * probe).sum(), (hidden, weight))
    torch.testing.assert_close(ent_c, token_entropy(hidden @ weight.T, temperature))
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)
    # and only the entropy in the loss
    _, ent_c = token_logprobs_and_entropy(
        hidden, weight, labels, 4, temperature=temperature, keep=keep
    )
    g_chunked = torch.autograd.grad(ent_c.sum(), (hidden, weight))
    g_plain = torch.autograd.grad(
        token_entropy(hidden @ weight.T, temperature).sum(), (hidden, weight)
    )
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# reused [tokens, vocab] buffers on a CPU (likelihood.reusing_head_buffers, the trainer's update)


def _loss_and_grads(hidden, weight, labels, chunk, keep, probe):
    lp, ent = token_logprobs_and_entropy(hidden, weight, labels, chunk, temperature=0.9, keep=keep)
    loss = (lp * probe).sum() + 0.3 * ent.sum()
    return (lp, ent, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reused_buffers_give_the_same_numbers(keep, dtype):
    """Inside reusing_head_buffers the chunks write into reused buffers: values and gradients
    equal those of fresh buffers, over several passes, and the free buffers go at the end."""
    hidden, weight, labels = _inputs(n=4, t=16, v=64, dtype=dtype)
    probe = torch.linspace(-1, 1, 16, dtype=dtype)
    fresh = _loss_and_grads(hidden, weight, labels, 24, keep, probe)
    assert len(likelihood.HEAD_BUFFERS._mine) == 0  # outside the block: nothing pooled
    with likelihood.reusing_head_buffers():
        for _ in range(3):
            reused = _loss_and_grads(hidden, weight, labels, 24, keep, probe)
            for a, b in zip(reused, fresh):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        # a logits and a log p buffer (a probs one for the entropy's gradient): not one per chunk
        assert 2 <= len(likelihood.HEAD_BUFFERS._mine) <= 3
        with torch.no_grad():
            lp, _ = token_logprobs_and_entropy(hidden, weight, labels, 24, temperature=0.9)
        torch.testing.assert_close(lp, fresh[0], rtol=0, atol=0)
    assert likelihood.HEAD_BUFFERS._free == []


def test_a_kept_buffer_is_not_handed_out_again_before_its_backward():
    """Two forwards before one backward (chosen and rejected, say): the first one's kept log p
    is not overwritten by the second's chunks."""
    hidden, weight, labels = _inputs(n=4, t=16, v=64, dtype=torch.float64)
    other = torch.randn_like(hidden, requires_grad=True)
    probe = torch.linspace(-1, 1, 16, dtype=torch.float64)

    def both():
        lp_a, ent_a = token_logprobs_and_entropy(hidden, weight, labels, 64)  # one chunk: kept
        lp_b, ent_b = token_logprobs_and_entropy(other, weight, labels, 64)
        loss = (lp_a * probe).sum() + ent_a.sum() - (lp_b * probe).sum() + 0.5 * ent_b.sum()
        return torch.autograd.grad(loss, (hidden, other, weight))

    fresh = both()
    with likelihood.reusing_head_buffers():
        reused = both()
    for a, b in zip(reused, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_buffers_are_not_reused_under_autocast_or_for_foreign_tensors():
    hidden, weight, labels = _inputs(n=2, t=8, h=16, v=32, dtype=torch.float32)
    with likelihood.reusing_head_buffers():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = token_logprobs_and_entropy(hidden, weight, labels, 8)
        (lp.sum() + ent.sum()).backward()
        assert len(likelihood.HEAD_BUFFERS._mine) == 0
        stranger = torch.zeros(100)
        likelihood.HEAD_BUFFERS.give(stranger[:10].view(2, 5))
        likelihood.HEAD_BUFFERS.give(None)
        assert likelihood.HEAD_BUFFERS._free == []


def test_head_buffers_hand_out_the_smallest_fit_and_grow_by_a_quarter():
    buffers = likelihood.HeadBuffers(max_free=2)
    buffers.active = 1  # as inside reusing_head_buffers
    a = buffers.take(4, 10, torch.float32)  # 40 elements asked: 50 allocated
    assert a.shape == (4, 10) and a._base.numel() == 50 and buffers.allocated == 1
    buffers.give(a)
    b = buffers.take(5, 10, torch.float32)  # 50 fit in the free 50
    assert b._base is a._base and buffers.allocated == 1
    c = buffers.take(2, 10, torch.float32)  # nothing free: a new one
    d = buffers.take(2, 10, torch.float64)  # another dtype: a new one
    assert buffers.allocated == 3
    for t in (b, c, d):
        buffers.give(t)
    assert len(buffers._free) == 2  # at most max_free: the smallest (c's 25) was dropped
    assert all(base is not c._base for base in buffers._free)
    e = buffers.take(10, 10, torch.float32)  # outgrows the free float32 one, which it replaces
    assert e._base.numel() == 125 and [f.dtype for f in buffers._free] == [torch.float64]
    assert buffers.taken == 5


def test_a_backward_after_the_block_frees_its_buffers():
    hidden, weight, labels = _inputs(n=2, t=8, h=16, v=32, dtype=torch.float32)
    with likelihood.reusing_head_buffers():
        lp, _ = token_logprobs_and_entropy(hidden, weight, labels, 16)  # kept for backward
    lp.sum().backward()
    assert likelihood.HEAD_BUFFERS._free == []
    torch.testing.assert_close(
        hidden.grad,
        torch.autograd.grad(token_logprobs(hidden @ weight.T, labels).sum(), hidden)[0],
    )
