"""The unified loss: UPGE gradients token by token, presets vs their original formulations,
micro-batch invariance, and robustness properties (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpt
from hpt.algorithms import get_algorithm, list_algorithms, outcome_advantages
from hpt.estimator.unified import KIND_ID, KINDS, Counts, batch_counts, unified_loss

AGGREGATIONS = [
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum-norm",
]


def make_batch(algorithm, n=12, length=9, seed=0, dtype=torch.float64, spread=0.4, kinds=None):
    """Random log-probs in (log .05, log .95), ragged masks with holes, mixed kinds."""
    g = torch.Generator().manual_seed(seed)
    logprobs = (torch.rand(n, length, generator=g, dtype=dtype) * 0.9 + 0.05).log()
    old = logprobs + spread * torch.randn(n, length, generator=g, dtype=dtype)
    old[::3] = logprobs[::3]  # some rows exactly on-policy (never clipped)
    lengths = torch.randint(0, length + 1, (n,), generator=g)
    lengths[0], lengths[1] = length, 0  # a full row and a zero-length row
    mask = torch.arange(length)[None] < lengths[:, None]
    mask &= torch.rand(n, length, generator=g) > 0.15  # holes
    shape = (n, length) if algorithm.needs_values else (n,)
    advantages = torch.randn(*shape, generator=g, dtype=dtype)
    if kinds is None:
        present = algorithm.kinds
        order = torch.randperm(n, generator=g)
        kinds = torch.tensor([KIND_ID[present[int(i) % len(present)]] for i in order])
    entropy = torch.rand(n, length, generator=g, dtype=dtype) * 2.0
    return {
        "logprobs": logprobs,
        "old_logprobs": old,
        "advantages": advantages,
        "response_mask": mask,
        "kinds": kinds,
        "entropy": entropy,
    }


def expected_grad(algorithm, batch, row_weights=None):
    """d loss / d logprobs from the UPGE formula, written independently of hpt.estimator:

    -coef * agg_weight * 1_stable * (1/pi_ref) * A * w * d g(pi) / d log pi, summed over terms.
    """
    lp = batch["logprobs"].detach()
    old = batch["old_logprobs"].detach()
    m = batch["response_mask"].to(lp.dtype)
    kinds = batch["kinds"]
    pi = lp.exp()
    length = lp.shape[1]
    adv0 = batch["advantages"]
    adv0 = adv0[:, None].expand_as(lp) if adv0.dim() == 1 else adv0
    rw = torch.ones(lp.shape[0], 1, dtype=lp.dtype) if row_weights is None else row_weights[:, None]
    n_i = m.sum(-1, keepdim=True)
    entropy_seq = (batch["entropy"] * m).sum(-1, keepdim=True) / n_i.clamp_min(1)
    s = (((lp - old) * m).sum(-1, keepdim=True) / n_i.clamp_min(1)).exp().expand_as(lp)
    lo, hi, dual = algorithm.clip_low, algorithm.clip_high, algorithm.dual_clip
    grad = torch.zeros_like(lp)
    for term in algorithm.terms:
        rows = (kinds == KIND_ID[term.kind])[:, None].to(lp.dtype)
        km = m * rows
        adv = torch.ones_like(lp) if term.advantage == "one" else adv0
        weight = {
            "none": torch.ones_like(lp),
            "srft_sft": (0.5 * torch.exp(-entropy_seq)).expand_as(lp),
            "srft_rollout": torch.where(adv > 0, 0.1 * torch.exp(entropy_seq), 1.0),
        }[term.weight]
        adv = adv * weight * rw
        gamma = algorithm.shaping_gamma
        dg = pi if term.shaping == "none" else gamma * pi / (pi + gamma) ** 2
        inv_ref = {
            "current": 1 / pi,
            "old": 1 / old.exp(),
            "one": torch.ones_like(pi),
            "sequence": s / pi,
        }[term.reference]
        ratio = {"current": torch.ones_like(pi), "old": (lp - old).exp(), "one": pi, "sequence": s}[
            term.reference
        ]

        def keep(r, adv=adv):
            kept = ~(((adv > 0) & (r > 1 + hi)) | ((adv < 0) & (r < 1 - lo)))
            if dual is not None:
                kept &= ~((adv < 0) & (r > dual))
            return kept.to(lp.dtype)

        stable = {
            "none": torch.ones_like(lp),
            "clip": keep(ratio) if term.mask == "clip" else None,
            "sequence_clip": keep(s) if term.mask == "sequence_clip" else None,
            "cispo": ratio.clamp(1 - lo, 1 + hi) / ratio,
        }[term.mask]
        tokens, sequences = km.sum(), rows.sum()
        norm = algorithm.norm_length or length
        agg_weight = {
            "token-mean": 1 / tokens.clamp_min(1) * torch.ones_like(lp),
            "seq-mean-token-mean": 1
            / (n_i.clamp_min(1) * sequences.clamp_min(1))
            * torch.ones_like(lp),
            "seq-mean-token-sum": 1 / sequences.clamp_min(1) * torch.ones_like(lp),
            "seq-mean-token-sum-norm": 1 / (norm * sequences.clamp_min(1)) * torch.ones_like(lp),
            "token-sum-norm": 1 / norm * torch.ones_like(lp),
        }[term.aggregation or algorithm.aggregation]
        grad -= term.coef * agg_weight * stable * inv_ref * adv * dg * km
    return grad


CASES = [(name, {}) for name in list_algorithms()] + [
    ("grpo", {"dual_clip": 1.3}),
    ("dapo", {"dual_clip": 2.0, "aggregation": "seq-mean-token-sum"}),
    ("hpt", {"clip": True}),
    ("hpt", {"routes": "three_band", "gate_upper": 0.5}),
    ("luffy", {"shaping_gamma": 0.5, "rl_mask": "clip"}),
    ("gspo", {"clip_low": 0.2, "clip_high": 0.3}),
    ("cispo", {"clip_low": 0.3, "clip_high": 0.1}),
    ("reinforce", {"aggregation": "seq-mean-token-mean"}),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_is_the_upge_token_by_token(name, overrides, seed):
    algorithm = get_algorithm(name, **overrides)
    batch = make_batch(algorithm, seed=seed)
    logprobs = batch["logprobs"].clone().requires_grad_(True)
    out = unified_loss(
        algorithm,
        logprobs,
        batch["old_logprobs"],
        batch["advantages"],
        batch["response_mask"],
        kinds=batch["kinds"],
        entropy=batch["entropy"],
    )
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    want = expected_grad(algorithm, batch)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    assert want.abs().sum() > 0  # the test exercises a non-trivial gradient
    assert torch.all(grad[~batch["response_mask"]] == 0)


def test_clipping_is_active_in_the_gradient_test():
    """The clipped cases above really clip some tokens (else they could not catch a wrong mask)."""
    for name, overrides in [("grpo", {"dual_clip": 1.3}), ("gspo", {}), ("cispo", {})]:
        algorithm = get_algorithm(name, **overrides)
        batch = make_batch(algorithm)
        out = unified_loss(algorithm, **{k: v for k, v in batch.items() if k != "entropy"})
        assert out.metrics["clipfrac_low"] + out.metrics["clipfrac_high"] > 0, name
    out = unified_loss(
        get_algorithm("grpo", dual_clip=1.3),
        **{k: v for k, v in make_batch(get_algorithm("grpo")).items()},
    )
    assert out.metrics["clipfrac_dual"] > 0


def test_row_weights_multiply_the_advantage():
    algorithm = get_algorithm("hpt")
    batch = make_batch(algorithm, seed=3)
    weights = torch.rand(12, dtype=torch.float64) * 2
    logprobs = batch["logprobs"].clone().requires_grad_(True)
    out = unified_loss(
        algorithm,
        logprobs,
        batch["old_logprobs"],
        batch["advantages"],
        batch["response_mask"],
        kinds=batch["kinds"],
        row_weights=weights,
    )
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    torch.testing.assert_close(grad, expected_grad(algorithm, batch, row_weights=weights))


# ---- each preset equals its original formulation ------------------------------------------


def verl_agg(loss, mask, mode, norm=None):
    """verl's current agg_loss (core_algos.py) for one micro-batch = the whole batch."""
    mask = mask.to(loss.dtype)
    rows = loss.shape[0]
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(-1) / (mask.sum(-1) + 1e-8)).sum() / rows
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum() / rows
    if mode == "token-sum-norm":  # the HPT fork's compute_policy_loss(loss_remove_token_mean=True)
        return (loss * mask).sum() / (norm or loss.shape[-1])
    return ((loss * mask).sum(-1) / (norm or loss.shape[-1])).sum() / rows


def vanilla_policy_loss(old, lp, adv, mask, low, high, dual, mode, norm=None):
    """PPO's -min(rA, clip(r)A), dual-clip for A < 0 (verl `vanilla`)."""
    ratio = torch.exp(lp - old)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = torch.maximum(loss1, loss2)
    if dual is not None:
        clipped = torch.where(adv < 0, torch.minimum(-adv * dual, clipped), clipped)
    return verl_agg(clipped, mask, mode, norm)


def rollout_batch(seed=0, n=10, length=7, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.rand(n, length, generator=g, dtype=torch.float64) * 0.9 + 0.05).log()
    old = lp + spread * torch.randn(n, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return lp, old, adv, mask


def loss_and_grad(fn, lp):
    lp = lp.clone().requires_grad_(True)
    loss = fn(lp)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def assert_same(ours, theirs, lp):
    loss_a, grad_a = loss_and_grad(ours, lp)
    loss_b, grad_b = loss_and_grad(theirs, lp)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-7, atol=1e-10)


def test_sft_is_mean_token_nll():
    lp, _, _, mask = rollout_batch()
    algorithm = get_algorithm("sft")
    m = mask.double()
    assert_same(
        lambda x: hpt.unified_loss(algorithm, x, None, torch.zeros(10), mask).loss,
        lambda x: -(x * m).sum() / m.sum(),
        lp,
    )


@pytest.mark.parametrize("name", ["ppo", "grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dual", [None, 1.5])
def test_clipped_presets_equal_vanilla_ppo(name, aggregation, dual):
    algorithm = get_algorithm(name, aggregation=aggregation, dual_clip=dual)
    lp, old, adv, mask = rollout_batch(seed=len(name))
    if algorithm.needs_values:
        adv = adv[:, None] * torch.linspace(0.5, 1.5, lp.shape[1], dtype=torch.float64)
        adv_tok = adv
    else:
        adv_tok = adv[:, None].expand_as(lp)
    low, high = algorithm.clip_low, algorithm.clip_high
    assert_same(
        lambda x: hpt.unified_loss(algorithm, x, old, adv, mask).loss,
        lambda x: vanilla_policy_loss(old, x, adv_tok, mask, low, high, dual, aggregation),
        lp,
    )


def test_dapo_and_dr_grpo_defaults():
    dapo, dr = get_algorithm("dapo"), get_algorithm("dr_grpo")
    assert (dapo.clip_low, dapo.clip_high, dapo.aggregation) == (0.2, 0.28, "token-mean")
    assert dr.aggregation == "seq-mean-token-sum-norm" and dr.terms[0].advantage == "group_centered"


def test_dr_grpo_divides_by_a_constant_length():
    algorithm = get_algorithm("dr_grpo", norm_length=50)
    lp, old, adv, mask = rollout_batch(seed=4)
    m = mask.double()

    def original(x):
        r = torch.exp(x - old)
        a = adv[:, None]
        obj = torch.minimum(r * a, torch.clamp(r, 0.8, 1.2) * a)
        return -((obj * m).sum(-1) / 50.0).mean()

    assert_same(lambda x: hpt.unified_loss(algorithm, x, old, adv, mask).loss, original, lp)
    # the same responses padded to a longer T: unchanged (a constant normaliser, not the padding)
    pad = torch.zeros(10, 5, dtype=torch.float64)
    longer = hpt.unified_loss(
        algorithm,
        torch.cat([lp, pad], 1),
        torch.cat([old, pad], 1),
        adv,
        torch.cat([mask, pad.bool()], 1),
    )
    torch.testing.assert_close(longer.loss, hpt.unified_loss(algorithm, lp, old, adv, mask).loss)


def test_cispo_is_stop_gradient_clipped_weight_times_log_pi():
    algorithm = get_algorithm("cispo", clip_low=0.2, clip_high=0.28)
    lp, old, adv, mask = rollout_batch(seed=5, spread=0.6)
    m = mask.double()

    def original(x):
        weight = torch.clamp(torch.exp(x - old), 0.8, 1.28).detach()
        return -(weight * adv[:, None] * x * m).sum() / m.sum()

    assert_same(lambda x: hpt.unified_loss(algorithm, x, old, adv, mask).loss, original, lp)


def test_gspo_is_the_sequence_ratio_objective():
    algorithm = get_algorithm("gspo", clip_low=0.03, clip_high=0.04)
    lp, old, adv, mask = rollout_batch(seed=6, spread=0.15)
    m = mask.double()

    def original(x):  # GSPO-token (arXiv 2507.18071): s_i,t = sg(s_i) pi_t / sg(pi_t)
        log_s = ((x - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        s = torch.exp(log_s.detach() + x - x.detach())
        a = adv[:, None]
        loss = torch.maximum(-a * s, -a * torch.clamp(s, 0.97, 1.04))
        return ((loss * m).sum(-1) / m.sum(-1)).mean()

    assert_same(lambda x: hpt.unified_loss(algorithm, x, old, adv, mask).loss, original, lp)
    ours = hpt.unified_loss(algorithm, lp, old, adv, mask).metrics
    assert 0 < ours["clipfrac_low"] + ours["clipfrac_high"] < 1  # some sequences clipped, not all


def test_reinforce_and_rloo_are_advantage_weighted_log_likelihood():
    lp, _, adv, mask = rollout_batch(seed=7)
    m = mask.double()
    reinforce, rloo = get_algorithm("reinforce"), get_algorithm("rloo")
    assert_same(
        lambda x: hpt.unified_loss(reinforce, x, None, adv, mask).loss,
        lambda x: -(adv[:, None] * x * m).sum() / m.sum(),
        lp,
    )
    assert_same(
        lambda x: hpt.unified_loss(rloo, x, None, adv, mask).loss,
        lambda x: -(adv[:, None] * x * m).sum(-1).mean(),
        lp,
    )


def grouped_batch(seed=8, questions=3, n=4, length=6):
    """`questions` groups of n rollouts + 1 demonstration each (demonstration last)."""
    g = torch.Generator().manual_seed(seed)
    rows = questions * (n + 1)
    lp = (torch.rand(rows, length, generator=g, dtype=torch.float64) * 0.9 + 0.05).log()
    old = lp + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (rows,), generator=g)[:, None]
    group = torch.arange(questions).repeat_interleave(n + 1)
    is_demo = (torch.arange(rows) % (n + 1)) == n
    rewards = torch.randint(0, 2, (rows,), generator=g).double()
    rewards[is_demo] = 1.0
    return lp, old, mask, group, is_demo, rewards


def test_luffy_demo_term_is_minus_a_f_pi_and_rollouts_use_the_ratio():
    algorithm = get_algorithm("luffy")
    lp, old, mask, group, is_demo, rewards = grouped_batch()
    adv = outcome_advantages(algorithm, rewards, group, is_demo=is_demo).double()
    # group statistics over rollouts AND the demonstration (SRFT / LUFFY)
    for q in range(3):
        rows = group == q
        r = rewards[rows]
        want = (r - r.mean()) / (r.std() + 1e-6) if r.std() > 0 else torch.zeros_like(r)
        torch.testing.assert_close(adv[rows], want, atol=1e-6, rtol=1e-5)
    demo = (mask & is_demo[:, None]).double()
    roll = (mask & ~is_demo[:, None]).double()

    def original(x):
        a = adv[:, None]
        f = x.exp() / (x.exp() + 0.1)
        demo_term = -(a * f * demo).sum() / demo.sum()
        rollout_term = -(a * torch.exp(x - old) * roll).sum() / roll.sum()
        return demo_term + rollout_term

    assert_same(
        lambda x: hpt.unified_loss(algorithm, x, old, adv, mask, is_demo).loss, original, lp
    )


def test_srft_terms():
    algorithm = get_algorithm("srft")
    lp, _, mask, group, is_demo, rewards = grouped_batch(seed=9)
    entropy = torch.rand(lp.shape, dtype=torch.float64)
    adv = outcome_advantages(algorithm, rewards, group, is_demo=is_demo).double()
    m = mask.double()
    demo, roll = m * is_demo[:, None], m * ~is_demo[:, None]
    h = ((entropy * m).sum(-1) / m.sum(-1))[:, None]
    correct = (rewards > 0)[:, None]

    def original(x):
        sft = -(0.5 * torch.exp(-h) * x * demo).sum() / demo.sum()
        f = x.exp() / (x.exp() + 0.1)
        luffy = -(adv[:, None] * f * demo).sum() / demo.sum()
        per_token = torch.where(correct, -(0.1 * torch.exp(h)) * x, x)
        rollouts = (per_token * roll).sum() / roll.sum()
        return sft + luffy + rollouts

    ours = lambda x: hpt.unified_loss(algorithm, x, None, adv, mask, is_demo, entropy=entropy).loss  # noqa: E731
    assert_same(ours, original, lp)


def test_hpt_is_sft_plus_unclipped_ratio_over_8192_plus_entropy_bonus():
    """The released trainer's loss, transcribed by hand, for one micro-batch on one GPU.

    ``mix_actor.update_policy`` with ``offline_loss_type=sft``, ``loss_remove_token_mean=True``,
    ``loss_remove_clip=True``, ``sft_loss_coef=1``, ``entropy_coeff=0.001``, mini = micro batch:
        sft_loss = masked_mean(-log_prob[demo rows], eos_mask[demo rows])
        pg_losses = -A * exp(log_prob - old_log_prob)                       (rollout rows)
        pg_loss = (pg_losses * eos_mask).sum() / eos_mask.shape[-1]   (the padded width = 8192)
        policy_loss = (sft_loss * 1 + pg_loss) - masked_mean(entropy, response_mask) * 0.001
        loss = policy_loss / gradient_accumulation                    (= 1)
    """
    algorithm = get_algorithm("hpt")
    lp, old, mask, group, is_demo, rewards = grouped_batch(seed=10)
    entropy = torch.rand(lp.shape, dtype=torch.float64, requires_grad=True)
    kinds = torch.where(is_demo, KIND_ID["sft"], KIND_ID["rollout"])
    adv = outcome_advantages(algorithm, rewards, group, kinds=kinds).double()
    assert torch.all(adv[is_demo] == 1.0)
    m = mask.double()

    def official(x):
        demo, roll = is_demo, ~is_demo
        sft_loss = (-x[demo] * m[demo]).sum() / m[demo].sum()
        pg_losses = -adv[roll][:, None] * torch.exp(x[roll] - old[roll])
        width = 8192  # verl pads responses to max_response_length: eos_mask.shape[-1]
        pg_loss = (pg_losses * m[roll]).sum() / width
        entropy_loss = (entropy * m).sum() / m.sum()
        policy_loss = sft_loss * 1.0 + pg_loss - entropy_loss * 0.001
        return policy_loss / 1

    out = hpt.unified_loss(algorithm, lp, old, adv, mask, kinds=kinds, entropy=entropy)
    torch.testing.assert_close(out.loss, official(lp))
    assert_same(
        lambda x: hpt.unified_loss(algorithm, x, old, adv, mask, kinds=kinds, entropy=entropy).loss,
        official,
        lp,
    )
    (grad_entropy,) = torch.autograd.grad(out.loss, entropy)
    torch.testing.assert_close(grad_entropy, -0.001 * m / m.sum())
    assert set(out.terms) == {"pg_sft", "pg_rollout", "pg_off_policy", "entropy"}
    assert out.terms["pg_off_policy"] == 0
    # Dr.GRPO's normaliser would also divide the RL sum by the number of rollouts
    dr = get_algorithm("hpt", aggregation="seq-mean-token-sum-norm")
    rl_only = hpt.unified_loss(dr, lp, old, adv, mask, kinds=kinds).terms["pg_rollout"]
    ours = hpt.unified_loss(algorithm, lp, old, adv, mask, kinds=kinds).terms["pg_rollout"]
    torch.testing.assert_close(ours, rl_only * (~is_demo).sum())


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_gradient(estimator):
    algorithm = get_algorithm("grpo", kl_coef=0.1, kl_estimator=estimator)
    lp, old, adv, mask = rollout_batch(seed=11)
    ref = lp + 0.2 * torch.randn(lp.shape, dtype=torch.float64)
    x = lp.clone().requires_grad_(True)
    with_kl = hpt.unified_loss(algorithm, x, old, adv, mask, ref_logprobs=ref)
    without = hpt.unified_loss(algorithm, x, old, adv, mask)
    (g1,) = torch.autograd.grad(with_kl.loss, x)
    (g0,) = torch.autograd.grad(without.loss, x)
    d = {"k1": torch.ones_like(lp), "k2": lp - ref, "k3": 1 - torch.exp(ref - lp)}[estimator]
    m = mask.double()
    torch.testing.assert_close(g1 - g0, 0.1 * d * m / m.sum())
    assert with_kl.metrics["kl"] == pytest.approx(float(with_kl.terms["kl"].detach()))


# ---- micro-batch invariance ------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", ["hpt", "grpo", "luffy", "srft", "sft"])
def test_micro_batches_sum_to_the_mini_batch(aggregation, name):
    algorithm = get_algorithm(name, aggregation=aggregation, kl_coef=0.05, entropy_coef=0.01)
    if name == "hpt":  # mixed SFT + RL rows (and the three-band off-policy rows)
        algorithm = get_algorithm(
            name, aggregation=aggregation, routes="three_band", entropy_coef=0.01
        )
    batch = make_batch(algorithm, n=13, seed=12)
    ref = batch["logprobs"] + 0.1
    weights = torch.rand(13, dtype=torch.float64) + 0.5

    def run(rows, counts):
        lp = batch["logprobs"][rows].clone().requires_grad_(True)
        out = unified_loss(
            algorithm,
            lp,
            batch["old_logprobs"][rows],
            batch["advantages"][rows],
            batch["response_mask"][rows],
            kinds=batch["kinds"][rows],
            entropy=batch["entropy"][rows],
            ref_logprobs=ref[rows],
            row_weights=weights[rows],
            counts=counts,
        )
        (grad,) = torch.autograd.grad(out.loss, lp)
        return out.loss.detach(), grad

    full_loss, full_grad = run(torch.arange(13), None)
    order = torch.randperm(13, generator=torch.Generator().manual_seed(1))
    chunks = [order[:5], order[5:9], order[9:]]
    counts = Counts()
    for rows in chunks:
        counts = counts + batch_counts(
            algorithm, batch["kinds"][rows], batch["response_mask"][rows]
        )
    counts = Counts.from_tensor(counts.to_tensor())  # the all-reduce round trip
    total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(full_grad)
    for rows in chunks:
        loss, g = run(rows, counts)
        total += loss
        grad[rows] = g
    torch.testing.assert_close(total, full_loss)
    torch.testing.assert_close(grad, full_grad)
    # per-micro-batch normalisation (the official code's) would not match:
    if aggregation not in ("seq-mean-token-sum-norm", "token-sum-norm") or name != "sft":
        local = sum(run(rows, None)[0] for rows in chunks)
        assert not torch.isclose(local, full_loss)


# ---- structure: kinds without terms, empty kinds, metrics --------------------------------------


def test_rows_of_kinds_without_terms_contribute_nothing():
    algorithm = get_algorithm("grpo")
    batch = make_batch(algorithm, seed=13)
    kinds = batch["kinds"].clone()
    kinds[:4] = KIND_ID["sft"]
    lp = batch["logprobs"].clone().requires_grad_(True)
    args = (batch["old_logprobs"], batch["advantages"], batch["response_mask"])
    out = unified_loss(algorithm, lp, *args, kinds=kinds)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.all(grad[:4] == 0)
    changed = batch["logprobs"].clone()
    changed[:4] = -3.0
    again = unified_loss(algorithm, changed, *args, kinds=kinds)
    torch.testing.assert_close(again.loss, out.loss.detach())


@pytest.mark.parametrize(
    "name, overrides",
    [(name, {}) for name in list_algorithms()]
    + [
        ("grpo", {"entropy_coef": 0.01}),
        ("grpo", {"kl_coef": 0.1}),
        ("hpt", {"entropy_coef": 0.0}),
    ],
)
def test_rows_without_gradient_are_those_autograd_leaves_at_zero(name, overrides):
    """``rows_without_gradient`` against autograd: the rows it names get an exactly zero gradient
    (log-probs and entropy) and change nothing in the loss, and every row with a non-zero
    advantage or an SFT term and a response is named by it only where that holds too."""
    from hpt.estimator.unified import rows_without_gradient

    algorithm = get_algorithm(name, **overrides)
    batch = make_batch(algorithm, n=16, seed=21)
    advantages = batch["advantages"].clone()
    advantages[::2] = 0.0  # half the rows: a group whose rewards were all equal
    weights = torch.ones(16, dtype=advantages.dtype)
    weights[3] = 0.0  # a row the soft gate weighs 0
    ref = batch["logprobs"] - 0.2
    lp = batch["logprobs"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(True)
    # on-policy (ratio 1): no token is clipped, so only the advantage can zero a row's gradient
    args = (lp, batch["logprobs"], advantages, batch["response_mask"])
    out = unified_loss(
        algorithm,
        *args,
        kinds=batch["kinds"],
        entropy=entropy,
        ref_logprobs=ref,
        row_weights=weights,
    )
    grad_lp, grad_entropy = torch.autograd.grad(out.loss, (lp, entropy), allow_unused=True)
    grad_entropy = torch.zeros_like(lp) if grad_entropy is None else grad_entropy
    touched = ((grad_lp != 0) | (grad_entropy != 0)).any(dim=1)
    without = rows_without_gradient(
        algorithm, batch["kinds"], advantages, batch["response_mask"], weights
    )
    assert not (without & touched).any()  # never names a row that moves the weights
    if algorithm.entropy_coef or algorithm.kl_coef or algorithm.needs_values:
        assert not without.any()  # a term reaches every row (PPO: its value loss)
    else:  # and names every row autograd leaves at zero (a row with a response)
        has_response = batch["response_mask"].any(dim=1)
        assert torch.equal(without[has_response], ~touched[has_response])
        assert without.any()
        # the loss without those rows' log-probs is the same (they are only counted)
        changed = batch["logprobs"].clone()
        changed[without] = -3.0
        again = unified_loss(
            algorithm,
            changed,
            *args[1:],
            kinds=batch["kinds"],
            entropy=batch["entropy"],
            ref_logprobs=ref,
            row_weights=weights,
        )
        torch.testing.assert_close(again.loss, out.loss.detach())


def test_rows_without_gradient_needs_a_mask_that_scales_with_the_advantage():
    """A registered mask without the ``scales_with_advantage`` trait keeps its rows."""
    import dataclasses

    from hpt.estimator.mask import MASKS, register_mask
    from hpt.estimator.unified import rows_without_gradient

    if "test_offset" not in MASKS:

        @register_mask("test_offset")
        def offset(surrogate, ratio, advantages, logprobs, old_logprobs, mask, clip):
            masked = MASKS.get("none")(
                surrogate, ratio, advantages, logprobs, old_logprobs, mask, clip
            )
            return masked._replace(objective=masked.objective + 0.1 * surrogate)

    algorithm = get_algorithm("reinforce")
    custom = dataclasses.replace(
        algorithm, terms=tuple(dataclasses.replace(t, mask="test_offset") for t in algorithm.terms)
    )
    kinds = torch.full((3,), KIND_ID["rollout"])
    mask = torch.ones(3, 4, dtype=torch.bool)
    zero = torch.zeros(3)
    assert rows_without_gradient(algorithm, kinds, zero, mask).all()
    assert not rows_without_gradient(custom, kinds, zero, mask).any()


def test_empty_kinds_give_zero_terms_not_nan():
    algorithm = get_algorithm("hpt")
    lp, old, adv, mask = rollout_batch()
    x = lp.clone().requires_grad_(True)
    out = unified_loss(algorithm, x, old, adv, mask, kinds=torch.zeros(10, dtype=torch.long))
    assert out.terms["pg_sft"] == 0 and torch.isfinite(out.loss)
    only_sft = unified_loss(algorithm, x, old, adv, mask, kinds=torch.ones(10, dtype=torch.long))
    assert only_sft.terms["pg_rollout"] == 0
    empty = unified_loss(algorithm, x, old, adv, torch.zeros_like(mask))
    assert empty.loss == 0
    (grad,) = torch.autograd.grad(empty.loss, x)
    assert torch.all(grad == 0)
    assert all(math.isfinite(v) for v in empty.metrics.values())


def test_metrics():
    algorithm = get_algorithm("grpo", clip_low=0.1, clip_high=0.1)
    lp = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.tensor(
        [[0.0, -0.5, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64
    )  # r = 1, e^.5, 1 / 1, e^-.5, 1
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = unified_loss(algorithm, lp, old, adv, mask)
    assert out.metrics["clipfrac_high"] == pytest.approx(1 / 5)  # A > 0, r = e^.5 > 1.1
    assert out.metrics["clipfrac_low"] == pytest.approx(1 / 5)  # A < 0, r = e^-.5 < 0.9
    assert out.metrics["ratio_max"] == pytest.approx(math.exp(0.5))
    ratios = torch.tensor([1, math.exp(0.5), 1, 1, math.exp(-0.5)])
    assert out.metrics["ratio_mean"] == pytest.approx(float(ratios.mean()))
    assert out.metrics["approx_kl"] == pytest.approx(0.0)  # (-(.5) + .5) / 5
    assert out.metrics["tokens_rollout"] == 5 and out.metrics["tokens_sft"] == 0
    assert out.metrics["loss"] == pytest.approx(float(out.loss))


def test_on_policy_default_when_old_logprobs_missing():
    algorithm = get_algorithm("grpo")
    lp, _, adv, mask = rollout_batch()
    a = unified_loss(algorithm, lp, None, adv, mask)
    b = unified_loss(algorithm, lp, lp.clone(), adv, mask)
    torch.testing.assert_close(a.loss, b.loss)


def test_is_demo_maps_to_the_demonstration_kind():
    lp, old, adv, mask = rollout_batch()
    is_demo = torch.arange(10) < 3
    for name, kind in [
        ("sft", "sft"),
        ("hpt", "sft"),
        ("luffy", "off_policy"),
        ("srft", "off_policy"),
    ]:
        out = unified_loss(get_algorithm(name), lp, old, adv, mask, is_demo)
        assert out.metrics[f"sequences_{kind}"] == 3, name
    sft_default = unified_loss(get_algorithm("sft"), lp, None, adv, mask)
    assert sft_default.metrics["sequences_sft"] == 10  # SFT's rows are demonstrations by default


# ---- properties ------------------------------------------------------------------------------

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    name=st.sampled_from(list_algorithms()),
    seed=st.integers(0, 10_000),
    extreme=st.sampled_from([0.0, 50.0, -50.0]),
    empty_rows=st.integers(0, 4),
)
def test_finite_with_empty_rows_and_extreme_ratios(name, seed, extreme, empty_rows):
    algorithm = (
        get_algorithm(name, dual_clip=3.0) if name in ("grpo", "ppo") else get_algorithm(name)
    )
    batch = make_batch(algorithm, n=8, seed=seed, dtype=torch.float32)
    if extreme:
        batch["old_logprobs"] = batch["logprobs"] - extreme
    batch["response_mask"][:empty_rows] = False
    lp = batch["logprobs"].clone().requires_grad_(True)
    entropy = batch.pop("entropy").requires_grad_(True)
    batch.pop("logprobs")
    out = unified_loss(algorithm, lp, **batch, entropy=entropy)
    grad_lp, grad_h = torch.autograd.grad(out.loss, (lp, entropy), allow_unused=True)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad_lp).all()
    assert (grad_h is None) == (algorithm.entropy_coef == 0)
    assert grad_h is None or torch.isfinite(grad_h).all()
    assert torch.all(grad_lp[:empty_rows] == 0)
    assert all(math.isfinite(v) for v in out.metrics.values())


@PROPERTY
@given(name=st.sampled_from(list_algorithms()), seed=st.integers(0, 10_000))
def test_bfloat16_inputs(name, seed):
    algorithm = get_algorithm(name)
    batch = make_batch(algorithm, n=8, seed=seed, dtype=torch.float32, spread=0.05)
    reference = unified_loss(algorithm, **batch)
    low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    lp = low.pop("logprobs").requires_grad_(True)
    out = unified_loss(algorithm, lp, **low)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    assert torch.isfinite(out.loss)
    assert float(out.loss.detach()) == pytest.approx(float(reference.loss), rel=0.05, abs=0.05)


@PROPERTY
@given(
    value=st.floats(-1e3, 1e3, allow_nan=False),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    estimator=st.sampled_from(["group_norm", "group_centered", "rloo", "batch_whiten"]),
)
def test_equal_rewards_give_zero_advantages(value, sizes, estimator):
    from hpt.estimator.advantage import get_advantage

    group = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    rewards = torch.full((len(group),), value)
    out = get_advantage(estimator)(rewards, group, torch.ones_like(group, dtype=torch.bool))
    assert torch.all(out == 0)


@PROPERTY
@given(rewards=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8))
def test_groups_of_one(rewards):
    from hpt.estimator.advantage import get_advantage

    r = torch.tensor(rewards)
    group = torch.arange(len(rewards)) * 7  # every row its own group, sparse ids
    include = torch.ones(len(rewards), dtype=torch.bool)
    for estimator in ["group_norm", "group_centered", "rloo"]:
        assert torch.all(get_advantage(estimator)(r, group, include) == 0), estimator
    for estimator in ["one", "sign", "batch_whiten"]:
        assert torch.isfinite(get_advantage(estimator)(r, group, include)).all()


def test_kinds_constant():
    assert KINDS == ("rollout", "sft", "off_policy")
    assert KIND_ID == {"rollout": 0, "sft": 1, "off_policy": 2}
