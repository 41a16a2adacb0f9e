"""The unified loss: one estimator for SFT, PPO, GRPO, ..., LUFFY, SRFT and HPT (arXiv 2509.04419).

For every :class:`~hpt.algorithms.Term` of an algorithm, over the rows of the term's sample kind::

    objective_t = 1_stable * A_hat * w_i * rho_t,      d rho_t = (1/pi_ref) * d g(pi_theta)
    loss       += -coef * aggregate(objective)

so that ``d loss / d logprobs`` is, token by token, the UPGE
``-coef * agg_weight * 1_stable * (1/pi_ref) * A_hat * w_i * d g(pi)/d logpi`` (``g`` = pi, or
LUFFY's ``f(pi)`` where the term shapes it; ``w_i`` = per-sequence weight x ``row_weights``).
An entropy bonus and a KL penalty to a reference model are separate named terms. Rows whose kind
has no term contribute nothing; a kind without rows gives a zero (not NaN) term.

Sample kinds: ``"rollout"`` (sampled from the model), ``"sft"`` (a demonstration trained with an
SFT term), ``"off_policy"`` (a demonstration inside its question's RL group, LUFFY / SRFT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hpt.errors import ConfigError
from hpt.estimator import Registry
from hpt.estimator.advantage import get_advantage, get_sequence_weight, sequence_entropy
from hpt.estimator.aggregate import aggregate
from hpt.estimator.mask import MASKS, Clip, Masked, get_mask
from hpt.estimator.reference import REFERENCES, get_reference
from hpt.estimator.shaping import get_shaping

KINDS: tuple[str, ...] = ("rollout", "sft", "off_policy")
KIND_ID: dict[str, int] = {kind: index for index, kind in enumerate(KINDS)}

KLFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")
register_kl = KL_ESTIMATORS.register


@register_kl("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``log pi - log pi_ref`` (Schulman, "Approximating KL divergence", 2020). [N,T] -> [N,T]."""
    return logprobs - ref_logprobs


@register_kl("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``0.5 (log pi - log pi_ref)^2`` (Schulman 2020). [N,T] -> [N,T]."""
    return 0.5 * (logprobs - ref_logprobs).square()


@register_kl("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``exp(d) - d - 1`` with ``d = log pi_ref - log pi``, clamped as verl (GRPO's KL). [N,T] -> [N,T]."""
    d = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


@dataclass(frozen=True)
class Counts:
    """Normalisers of one optimiser mini-batch, per sample kind (indexed by ``KIND_ID``).

    Sum the counts of all micro-batches (``+``) and all-reduce them over data-parallel ranks
    (``to_tensor`` / ``from_tensor``, SUM), then pass them to every micro-batch's
    :func:`unified_loss` so micro-batch losses add up to the mini-batch loss. DDP / FSDP
    *average* gradients over ranks: multiply each rank's loss by the world size (verl's
    ``dp_size``) so the sum is the mini-batch gradient. (The official HPT code normalises each
    micro-batch by its own counts, so its SFT / RL balance depends on packing; this does not.)

    Attributes:
        tokens: valid response tokens of each kind. sequences: rows of each kind.
    """

    tokens: tuple[float, ...] = (0.0, 0.0, 0.0)
    sequences: tuple[float, ...] = (0.0, 0.0, 0.0)

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            tuple(a + b for a, b in zip(self.tokens, other.tokens)),
            tuple(a + b for a, b in zip(self.sequences, other.sequences)),
        )

    def to_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """[2 * len(KINDS)] float64: tokens then sequences (for ``all_reduce``)."""
        return torch.tensor(self.tokens + self.sequences, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> Counts:
        """Inverse of :meth:`to_tensor`."""
        values = [float(v) for v in tensor.detach().cpu().tolist()]
        half = len(values) // 2
        return cls(tuple(values[:half]), tuple(values[half:]))

    def of(self, kinds: Sequence[str]) -> tuple[float, float]:
        """(tokens, sequences) summed over ``kinds``."""
        ids = [KIND_ID[kind] for kind in kinds]
        return sum(self.tokens[i] for i in ids), sum(self.sequences[i] for i in ids)


@dataclass
class LossOutput:
    """The unified loss of a (micro-)batch.

    Attributes:
        loss: scalar, differentiable w.r.t. ``logprobs`` (and ``entropy``).
        stats: the metrics as detached scalar tensors on the loss's device: ``loss``,
            ``clipfrac_low``, ``clipfrac_high``, ``clipfrac_dual``, ``ratio_mean``, ``ratio_max``,
            ``approx_kl``, ``tokens_<kind>``, ``sequences_<kind>``, ``pg_<kind>``, ``entropy`` /
            ``kl`` (when given), ``entropy_mean`` (with ``entropy``). Local to this micro-batch;
            a trainer sums them on the device and reads them once a step (no host sync a pass).
        terms: named scalar tensors: ``pg_<kind>`` per kind with terms, ``entropy``, ``kl``.
    """

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """``stats`` as floats (one read from the device for all of them)."""
        return read_floats(self.stats)


def read_floats(stats: dict[str, Tensor]) -> dict[str, float]:
    """Scalar tensors as floats, in one device-to-host copy (float64: exact for float32 values
    and for integer counts below 2**53)."""
    if not stats:
        return {}
    values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in stats.values()])
    return dict(zip(stats, values.tolist()))


def _as_long(values: Any, n: int, device: torch.device, what: str) -> Tensor:
    """A [N] long tensor of kind ids from a tensor or a list of ids / kind names."""
    if isinstance(values, Tensor):
        out = values.to(dtype=torch.long).reshape(-1)
    else:
        items = list(values)
        try:
            ids = [KIND_ID[v] if isinstance(v, str) else int(v) for v in items]
        except KeyError as error:
            raise ConfigError(
                f"{what}: unknown sample kind {error.args[0]!r}; valid: {', '.join(KINDS)}"
            ) from None
        out = torch.tensor(ids, dtype=torch.long)
    if out.numel() != n:
        raise ValueError(f"{what}: expected {n} rows, got {out.numel()}")
    # checked where reading them is free: ids on an accelerator would cost a host sync each call
    # (the trainer's come from collate, and are checked on the CPU when a mini-batch is counted)
    if out.device.type == "cpu" and out.numel() and (out.min() < 0 or out.max() >= len(KINDS)):
        raise ValueError(f"{what}: kind ids must be in 0..{len(KINDS) - 1} ({', '.join(KINDS)})")
    return out.to(device)


def term_kinds(algorithm: Any) -> list[str]:
    """Kinds that have at least one term, in ``KINDS`` order."""
    present = {term.kind for term in algorithm.terms}
    return [kind for kind in KINDS if kind in present]


def resolve_kinds(
    algorithm: Any,
    n: int,
    is_demo: Any = None,
    kinds: Any = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Each row's kind id [N]: ``kinds`` if given; else ``is_demo`` (True -> the algorithm's
    demonstration kind, False -> rollout); else every row is the algorithm's default kind
    (rollout if it has rollout terms, else its demonstration kind: SFT's rows are demonstrations).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if kinds is not None:
        return _as_long(kinds, n, device, "kinds")
    demo = KIND_ID[algorithm.demo_kind]
    if is_demo is not None:
        flags = torch.as_tensor(is_demo, device=device).reshape(-1).bool()
        if flags.numel() != n:
            raise ValueError(f"is_demo: expected {n} rows, got {flags.numel()}")
        return torch.where(flags, demo, KIND_ID["rollout"]).long()
    default = KIND_ID["rollout"] if "rollout" in term_kinds(algorithm) else demo
    return torch.full((n,), default, dtype=torch.long, device=device)


def batch_counts(algorithm: Any, kinds: Any, response_mask: Tensor) -> Counts:
    """The normalisers of these rows: valid tokens and rows of each kind.

    Args:
        algorithm: the Algorithm (kept for the contract; every kind is counted).
        kinds: [N] kind ids (or names). response_mask: [N, T] bool or 0/1.
    """
    mask = response_mask.to(torch.float64)
    kind_ids = _as_long(kinds, mask.shape[0], mask.device, "kinds")
    return Counts.from_tensor(torch.cat(_kind_counts(kind_ids, mask)))  # one read from the device


def _kind_counts(kind_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """([K] valid tokens, [K] rows) of each kind (``KINDS`` order), in ``mask``'s dtype."""
    of_kind = kind_ids[:, None] == torch.arange(len(KINDS), device=kind_ids.device)  # [N, K]
    of_kind = of_kind.to(mask.dtype)
    # a product and a sum, not a matmul: TF32 or autocast would round the counts
    return (mask.sum(-1, keepdim=True) * of_kind).sum(0), of_kind.sum(0)


def _advantage_matrix(advantages: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """[N] or [N, T] advantages as a detached [N, T] of ``dtype``."""
    advantages = advantages.detach().to(dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.expand(shape)


def term_objective(
    term: Any,
    algorithm: Any,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    seq_entropy: Tensor,
    row_weights: Tensor,
) -> Masked:
    """One term's per-token objective over all rows (the caller keeps the term's kind).

    Shapes: logprobs, old_logprobs, advantages, mask [N, T]; seq_entropy, row_weights [N, 1].
    Returns the mask's ``Masked`` (objective [N, T] and clip indicators).
    """
    log_likelihood = get_shaping(term.shaping)(logprobs, algorithm.shaping_gamma)
    reference = get_reference(term.reference)(log_likelihood, logprobs, old_logprobs, mask)
    if term.advantage == "one":
        advantage = torch.ones_like(advantages)
    else:
        get_advantage(term.advantage)  # validates the name
        advantage = advantages
    weight = get_sequence_weight(term.weight)(advantage, seq_entropy)
    clip = Clip(algorithm.clip_low, algorithm.clip_high, algorithm.dual_clip)
    return get_mask(term.mask)(
        reference.surrogate,
        reference.ratio,
        advantage * weight * row_weights,
        logprobs,
        old_logprobs,
        mask,
        clip,
    )


def rows_without_gradient(
    algorithm: Any,
    kinds: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    row_weights: Tensor | None = None,
) -> Tensor:
    """[N] bool: the rows that add nothing to :func:`unified_loss`'s value or gradient.

    A row's terms (those of its kind) each scale with its effective advantage (the mask's
    ``scales_with_advantage`` trait): the batch's advantage, or 1 for terms whose advantage is
    ``one`` (SFT), times its row weight. A row is without gradient when that is 0 at every
    response token for all its terms (a GRPO group whose rollouts all got the same reward, a
    row the soft gate weighs 0), and only while no term reaches every row whatever its
    advantage: no entropy bonus, no KL penalty, no value loss. Its tokens still count in the
    normalisers (:func:`batch_counts`), so leaving it out of the backward changes no gradient.
    Shapes: kinds [N] ids, advantages [N] or [N, T], response_mask [N, T], row_weights [N].
    """
    n = kinds.shape[0]
    none = torch.zeros(n, dtype=torch.bool, device=kinds.device)
    if algorithm.entropy_coef or algorithm.kl_coef or algorithm.needs_values:
        return none
    advantages = advantages if advantages.dim() == 2 else advantages[:, None]
    zero_advantage = ((advantages == 0) | ~response_mask.bool()).all(dim=1)
    zero_weight = none if row_weights is None else row_weights.reshape(n) == 0
    without = ~none
    for term in algorithm.terms:
        rows = kinds == KIND_ID[term.kind]
        if not MASKS.trait(term.mask, "scales_with_advantage"):
            without &= ~rows  # a mask that may not vanish at A = 0 (e.g. a custom one)
            continue
        zero = zero_weight if term.advantage == "one" else zero_weight | zero_advantage
        without &= ~rows | zero
    return without


def unified_loss(
    algorithm: Any,
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    is_demo: Tensor | None = None,
    *,
    kinds: Tensor | None = None,
    entropy: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    row_weights: Tensor | None = None,
    counts: Counts | None = None,
) -> LossOutput:
    """The UPGE loss of an algorithm on a (micro-)batch.

    Args:
        algorithm: an :class:`hpt.algorithms.Algorithm` (its terms and settings).
        logprobs: [N, T] current token log-probs (differentiable; any float dtype, computed in fp32).
        old_logprobs: [N, T] sampling-policy log-probs; None means on-policy (``logprobs.detach()``).
        advantages: [N] outcome or [N, T] token advantages (``outcome_advantages`` / ``gae``).
            Terms whose advantage is ``one`` ignore them.
        response_mask: [N, T] bool or 0/1, the response tokens.
        is_demo: [N] bool, row is a demonstration (-> the algorithm's demonstration kind).
        kinds: [N] kind ids (``KIND_ID``) or names; overrides ``is_demo``.
        entropy: [N, T] token entropies (differentiable) for the entropy bonus and SRFT's weights;
            without it the bonus is skipped and SRFT's ``H`` is the mean token NLL.
        ref_logprobs: [N, T] reference-model log-probs for the KL term (``kl_coef > 0``).
        row_weights: [N] per-row multipliers of A (the soft gate's alpha / beta), also applied
            to the entropy and KL terms.
        counts: the whole optimiser mini-batch's :class:`Counts` (summed over micro-batches and
            ranks); None: this batch's own counts.

    Returns:
        LossOutput with ``loss``, ``terms`` (``pg_<kind>``, ``entropy``, ``kl``) and ``metrics``.
        Entropy and KL terms use token-mean over the rows of kinds that have terms.
    """
    n, length = logprobs.shape
    device = logprobs.device
    kind_ids = resolve_kinds(algorithm, n, is_demo, kinds, device)
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    lp = logprobs.to(dtype)
    old = lp.detach() if old_logprobs is None else old_logprobs.detach().to(device, dtype)
    mask = response_mask.to(device=device, dtype=dtype)
    adv = _advantage_matrix(torch.as_tensor(advantages, device=device), lp.shape, dtype)
    weights = (
        torch.ones(n, 1, device=device, dtype=dtype)
        if row_weights is None
        else row_weights.detach().to(device, dtype).reshape(n, 1)
    )
    seq_entropy = sequence_entropy(entropy, lp, mask)
    counts = batch_counts(algorithm, kind_ids, mask) if counts is None else counts

    zero = (lp * 0.0).sum()
    loss, terms = zero, {}
    # clip counts in float64, so that their fractions are those of Python floats
    count = torch.zeros((), device=device, dtype=torch.float64)
    clipped = {"low": count, "high": count, "dual": count}
    clip_tokens = count
    for term in algorithm.terms:
        rows = (kind_ids == KIND_ID[term.kind])[:, None].to(dtype)
        kind_mask = mask * rows
        masked = term_objective(term, algorithm, lp, old, adv, kind_mask, seq_entropy, weights)
        tokens, sequences = counts.of([term.kind])
        value = aggregate(
            term.aggregation or algorithm.aggregation,
            -masked.objective,
            kind_mask,
            tokens=tokens,
            sequences=sequences,
            norm_length=algorithm.norm_length,
        )
        name = f"pg_{term.kind}"
        terms[name] = terms.get(name, zero) + term.coef * value
        loss = loss + term.coef * value
        if term.mask != "none":
            on = kind_mask > 0
            clip_tokens = clip_tokens + on.sum(dtype=torch.float64)
            for side, flags in zip(("low", "high", "dual"), masked[1:]):
                clipped[side] = clipped[side] + (flags & on).sum(dtype=torch.float64)

    active = term_kinds(algorithm)
    active_rows = torch.zeros(n, 1, device=device, dtype=dtype)
    for kind in active:
        active_rows = active_rows + (kind_ids == KIND_ID[kind])[:, None].to(dtype)
    active_mask = mask * active_rows
    active_tokens, _ = counts.of(active)
    if entropy is not None:
        bonus = aggregate(
            "token-mean", entropy.to(dtype) * weights, active_mask, tokens=active_tokens
        )
        terms["entropy"] = bonus
        if algorithm.entropy_coef:
            loss = loss - algorithm.entropy_coef * bonus
    if ref_logprobs is not None:
        estimate = KL_ESTIMATORS.get(algorithm.kl_estimator)(lp, ref_logprobs.detach().to(dtype))
        kl = aggregate("token-mean", estimate * weights, active_mask, tokens=active_tokens)
        terms["kl"] = kl
        if algorithm.kl_coef:
            loss = loss + algorithm.kl_coef * kl

    stats = _metrics(algorithm, kind_ids, lp, old, mask, entropy)
    stats["loss"] = loss.detach()
    for name, value in terms.items():
        stats[name] = value.detach()
    for side, value in clipped.items():
        stats[f"clipfrac_{side}"] = value / clip_tokens.clamp_min(1.0)
    return LossOutput(loss=loss, stats=stats, terms=terms)


def _metrics(
    algorithm: Any,
    kind_ids: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    entropy: Tensor | None,
) -> dict[str, Tensor]:
    """Ratio / approx-KL over rows of kinds trained against pi_old (1 and 0 without any such
    token), local token and row counts, and the mean token entropy (0 without tokens): detached
    scalar tensors, computed without reading the device."""
    tokens_of_kind, rows_of_kind = _kind_counts(kind_ids, mask)
    stats: dict[str, Tensor] = {}
    for kind in KINDS:
        stats[f"tokens_{kind}"] = tokens_of_kind[KIND_ID[kind]]
        stats[f"sequences_{kind}"] = rows_of_kind[KIND_ID[kind]]
    ratio_kinds = {t.kind for t in algorithm.terms if REFERENCES.trait(t.reference, "ratio")}
    rows = torch.zeros_like(kind_ids, dtype=torch.bool)
    for kind in ratio_kinds:
        rows |= kind_ids == KIND_ID[kind]
    on = (mask > 0) & rows[:, None]
    tokens = on.sum()
    some = tokens > 0
    log_ratio = (logprobs.detach() - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    stats["ratio_mean"] = torch.where(some, torch.where(on, ratio, 0.0).sum() / tokens, 1.0)
    stats["ratio_max"] = torch.where(some, torch.where(on, ratio, -torch.inf).amax(), 1.0)
    kl = torch.where(on, -log_ratio, 0.0).sum() / tokens.clamp_min(1)
    stats["approx_kl"] = torch.where(some, kl, 0.0)
    if entropy is not None:
        valid = mask > 0
        total = torch.where(valid, entropy.detach().float(), 0.0).sum()
        stats["entropy_mean"] = total / valid.sum().clamp_min(1)
    return stats


__all__ = [
    "KINDS",
    "KIND_ID",
    "KL_ESTIMATORS",
    "Counts",
    "LossOutput",
    "batch_counts",
    "read_floats",
    "resolve_kinds",
    "rows_without_gradient",
    "term_kinds",
    "unified_loss",
]
