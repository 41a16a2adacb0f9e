"""Loss aggregation: how per-token losses become one scalar, as verl's ``agg_loss`` defines it.

Every aggregation shares one signature::

    fn(loss[N,T], mask[N,T], tokens, sequences, norm_length) -> scalar

``tokens`` and ``sequences`` are the normalisers: the valid tokens and the rows (of the sample
kind being aggregated) in the *whole optimiser mini-batch*, over all micro-batches and all
data-parallel ranks. Dividing each micro-batch by the mini-batch's counts and summing makes the
gradient independent of how rows are split (verl's ``batch_num_tokens`` / ``global_batch_size``).
Rows count as sequences whether or not they have valid tokens, as in verl's current ``agg_loss``.

- ``token-mean``:               ``sum_{i,t} l m / tokens``                      (DAPO, arXiv 2503.14476)
- ``seq-mean-token-mean``:      ``sum_i (sum_t l m / |o_i|) / sequences``        (GRPO, arXiv 2402.03300)
- ``seq-mean-token-sum``:       ``sum_{i,t} l m / sequences``
- ``seq-mean-token-sum-norm``:  ``sum_{i,t} l m / norm_length / sequences``     (Dr.GRPO, arXiv 2503.20783)
- ``token-sum-norm``:           ``sum_{i,t} l m / norm_length``                  (HPT's released trainer)

``token-sum-norm`` is the official HPT code's ``loss_remove_token_mean`` path
(``(pg_losses * eos_mask).sum() / eos_mask.shape[-1]`` with the response limit 8192 as the padded
width): the token sum is divided by the constant only, not by the number of sequences, so the RL
term grows with the number of rollout tokens while the SFT term (a token mean) does not. Here the
sum runs over the whole optimiser mini-batch (all micro-batches, all ranks); the official code sums
per micro-batch and per GPU, and FSDP then averages over GPUs (README, differences).

``norm_length`` is verl's ``loss_scale_factor``: a constant (HPT's recipe: 8192, the response
limit); None uses the padded length T of the tensor given, which then varies between batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hpt.estimator import Registry

AggregateFn = Callable[[Tensor, Tensor, "float | Tensor", "float | Tensor", "int | None"], Tensor]
AGGREGATIONS: Registry[AggregateFn] = Registry("aggregation")
register_aggregation = AGGREGATIONS.register


def get_aggregation(name: str) -> AggregateFn:
    """The aggregation registered as ``name`` (ConfigError listing the valid ones otherwise)."""
    return AGGREGATIONS.get(name)


def _masked_sum(loss: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``loss`` where ``mask > 0``; NaN/inf outside the mask never leak in."""
    kept = torch.where(mask > 0, loss * mask, 0.0)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _safe(denominator: float | Tensor) -> float | Tensor:
    """A normaliser of 0 means nothing to normalise (the numerator is 0 too): divide by 1."""
    if isinstance(denominator, Tensor):
        return torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return denominator if denominator > 0 else 1.0


@register_aggregation("token-mean")
def token_mean(
    loss: Tensor,
    mask: Tensor,
    tokens: float | Tensor,
    sequences: float | Tensor,
    norm_length: int | None,
) -> Tensor:
    """``sum_{i,t} l m / tokens``: every token of the mini-batch weighs the same. [N,T] -> []."""
    return _masked_sum(loss, mask) / _safe(tokens)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(
    loss: Tensor,
    mask: Tensor,
    tokens: float | Tensor,
    sequences: float | Tensor,
    norm_length: int | None,
) -> Tensor:
    """``sum_i (sum_t l m / |o_i|) / sequences``: every response weighs the same. [N,T] -> []."""
    lengths = mask.sum(dim=-1).clamp_min(1.0)
    return (_masked_sum(loss, mask, dim=-1) / lengths).sum() / _safe(sequences)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(
    loss: Tensor,
    mask: Tensor,
    tokens: float | Tensor,
    sequences: float | Tensor,
    norm_length: int | None,
) -> Tensor:
    """``sum_{i,t} l m / sequences``: sum over a response's tokens, mean over responses. [N,T] -> []."""
    return _masked_sum(loss, mask) / _safe(sequences)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss: Tensor,
    mask: Tensor,
    tokens: float | Tensor,
    sequences: float | Tensor,
    norm_length: int | None,
) -> Tensor:
    """``sum_{i,t} l m / norm_length / sequences`` (Dr.GRPO's constant normaliser). [N,T] -> [].

    ``norm_length`` None: the padded length ``T`` (verl's default ``loss_mask.shape[-1]``).
    """
    length = loss.shape[-1] if norm_length is None else norm_length
    return _masked_sum(loss, mask) / _safe(float(length)) / _safe(sequences)


@register_aggregation("token-sum-norm")
def token_sum_norm(
    loss: Tensor,
    mask: Tensor,
    tokens: float | Tensor,
    sequences: float | Tensor,
    norm_length: int | None,
) -> Tensor:
    """``sum_{i,t} l m / norm_length`` (HPT's released ``loss_remove_token_mean``). [N,T] -> [].

    No division by the number of sequences or tokens: a sum over the mini-batch is already
    independent of how it is split into micro-batches. ``norm_length`` None: the padded length T.
    """
    length = loss.shape[-1] if norm_length is None else norm_length
    return _masked_sum(loss, mask) / _safe(float(length))


def aggregate(
    name: str,
    loss: Tensor,
    mask: Tensor,
    *,
    tokens: float | Tensor | None = None,
    sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> Tensor:
    """Aggregate ``loss`` [N, T] under ``mask`` [N, T] with the named rule.

    ``tokens`` / ``sequences`` default to this tensor's own counts (``mask.sum()`` and ``N``);
    pass the whole mini-batch's counts to make micro-batches add up to the full batch.
    """
    mask = mask.to(loss.dtype)
    tokens = mask.sum() if tokens is None else tokens
    sequences = float(loss.shape[0]) if sequences is None else sequences
    return get_aggregation(name)(loss, mask, tokens, sequences, norm_length)
