"""The paper's table as data: every algorithm is a composition of the UPGE's four parts.

An :class:`Algorithm` is a frozen row of settings plus its loss :class:`Term` s, each term naming
one reference (``1/pi_ref``), one advantage (``A_hat``), one mask (``1_stable``), one shaping and
one per-sequence weight, applied to the rows of one sample kind. The training loop reads these
fields and never branches on an algorithm's name; a new algorithm is a new entry in ``_TABLE``.

    >>> import hpt
    >>> hpt.get_algorithm("dapo").clip_high
    0.28
    >>> hpt.get_algorithm("hpt", gate_threshold=0.25, rl_mask="clip").terms[1].mask
    'clip'
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

import torch
from pydantic import AfterValidator, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError
from torch import Tensor
from typing_extensions import TypedDict

from hpt.errors import ConfigError
from hpt.estimator.advantage import (
    ADVANTAGES,
    SEQUENCE_WEIGHTS,
    get_advantage,
)
from hpt.estimator.aggregate import AGGREGATIONS
from hpt.estimator.mask import MASKS
from hpt.estimator.reference import REFERENCES
from hpt.estimator.shaping import SHAPINGS
from hpt.estimator.unified import KIND_ID, KINDS, KL_ESTIMATORS, resolve_kinds
from hpt.gate import GATES

SoftGate = Union[tuple[tuple[float, float, float], ...], Callable[[float], tuple[float, float]]]
# (P_max, alpha_rl, beta_sft): all-wrong questions learn from the demonstration only, half-solved
# ones from both, the rest from their rollouts only.
DEFAULT_SOFT_GATE: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 1.0),
    (0.5, 1.0, 0.5),
    (1.0, 1.0, 0.0),
)


@dataclass(frozen=True)
class Term:
    """One summand of the loss, applied to the rows of one sample kind.

    Attributes:
        kind: "rollout" | "sft" | "off_policy".
        reference: 1/pi_ref: "current" | "old" | "one" | "sequence".
        advantage: A_hat: "one" | "sign" | "group_norm" | "group_centered" | "rloo" | "batch_whiten" | "gae".
        mask: 1_stable: "none" | "clip" | "cispo" | "sequence_clip".
        shaping: "none" | "luffy" (f(p) = p / (p + shaping_gamma) in place of p).
        weight: per-sequence weight multiplying A: "none" | "srft_sft" | "srft_rollout".
        coef: the term's coefficient.
        aggregation: None: the algorithm's aggregation.
    """

    kind: str
    reference: str
    advantage: str
    mask: str = "none"
    shaping: str = "none"
    weight: str = "none"
    coef: float = 1.0
    aggregation: str | None = None


@dataclass(frozen=True)
class Algorithm:
    """An algorithm of the unified view: its terms and every setting the trainer needs.

    Attributes:
        name: table key. source: the paper it comes from. description: one line.
        terms: the loss terms (rebuilt from the fields below by :func:`get_algorithm`).
        routes: the gate: "rl" | "sft" | "off_policy" (fixed) or "switch" | "three_band" | "soft".
        group_with_demos: advantage statistics over rollouts AND off-policy demonstrations.
        clip_low: clip epsilon below 1. clip_high: clip epsilon above 1 (clip-higher).
        dual_clip: dual-clip constant c > 1 for A < 0, or None.
        aggregation: the RL terms' aggregation (token-mean | seq-mean-token-mean | seq-mean-token-sum
            | seq-mean-token-sum-norm | token-sum-norm). norm_length: the *-norm constant (None: padded T).
        shaping_gamma: LUFFY's gamma in f(p) = p / (p + gamma).
        sft_coef: coefficient of the SFT terms. entropy_coef: entropy bonus (needs ``entropy``).
        kl_coef: KL-to-reference penalty (needs a reference model). kl_estimator: "k1" | "k2" | "k3".
        gate_threshold: a question goes to SFT when its fraction correct P <= this.
        gate_upper: three_band: off_policy when gate_threshold < P <= gate_upper.
        soft_gate: soft gate: table of (P_max, alpha_rl, beta_sft) rows or a callable P -> (alpha, beta).
        gae_gamma, gae_lambda: GAE's discount and lambda.
        rl_mask: the stabilisation mask of the rollout terms (override ``clip=True`` sets "clip").
    """

    name: str
    source: str
    description: str
    terms: tuple[Term, ...] = ()
    routes: str = "rl"
    group_with_demos: bool = False
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: str = "token-mean"
    norm_length: int | None = None
    shaping_gamma: float = 0.1
    sft_coef: float = 1.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    gate_threshold: float = 0.0
    gate_upper: float = 0.5
    soft_gate: SoftGate = DEFAULT_SOFT_GATE
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95
    rl_mask: str = "none"

    @property
    def kinds(self) -> tuple[str, ...]:
        """Sample kinds that have at least one term, in KINDS order."""
        present = {term.kind for term in self.terms}
        return tuple(kind for kind in KINDS if kind in present)

    @property
    def demo_kind(self) -> str:
        """The kind a demonstration row gets: "sft" if there is an SFT-kind term, else "off_policy"."""
        return "off_policy" if "off_policy" in self.kinds and "sft" not in self.kinds else "sft"

    @property
    def needs_rollouts(self) -> bool:
        """Whether the trainer must sample rollouts (any rollout term)."""
        return "rollout" in self.kinds

    @property
    def needs_demonstrations(self) -> bool:
        """Whether questions need demonstrations (any sft or off_policy term)."""
        return any(kind != "rollout" for kind in self.kinds)

    @property
    def old_logprob_kinds(self) -> set[str]:
        """The row kinds of the terms that divide by pi_old (their reference or mask needs it)."""
        return {
            t.kind
            for t in self.terms
            if REFERENCES.trait(t.reference, "needs_old") or MASKS.trait(t.mask, "needs_old")
        }

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether a term divides by pi_old (its reference or its mask needs the ratio)."""
        return bool(self.old_logprob_kinds)

    @property
    def needs_values(self) -> bool:
        """Whether a term uses GAE (a critic)."""
        return any(ADVANTAGES.trait(t.advantage, "token_level") for t in self.terms)

    @property
    def needs_reference_model(self) -> bool:
        """Whether the KL penalty is on (kl_coef > 0)."""
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        """Whether ``unified_loss`` should get token entropies (bonus or SRFT's weights)."""
        return self.entropy_coef != 0 or any(
            SEQUENCE_WEIGHTS.trait(t.weight, "uses_entropy") for t in self.terms
        )


@dataclass(frozen=True)
class _Entry:
    """A row of the table: the source's defaults and how its terms follow from the settings."""

    source: str
    description: str
    build: Callable[[Algorithm], tuple[Term, ...]]
    defaults: Mapping[str, Any] = field(default_factory=dict)


def _on_policy_rl(reference: str, advantage: str) -> Callable[[Algorithm], tuple[Term, ...]]:
    """Terms of an RL algorithm with one rollout term whose mask is the algorithm's ``rl_mask``."""
    return lambda a: (Term("rollout", reference, advantage, mask=a.rl_mask),)


_TABLE: dict[str, _Entry] = {
    "sft": _Entry(
        "supervised fine-tuning (LUFFY's SFT baseline setting, arXiv 2504.14945)",
        "maximise the demonstration's likelihood: mean token NLL",
        lambda a: (Term("sft", "current", "one", coef=a.sft_coef),),
        {"routes": "sft", "aggregation": "token-mean"},
    ),
    "reinforce": _Entry(
        "REINFORCE (Williams 1992); the UPGE table's +-1 advantage",
        "on-policy policy gradient with A = +1 for correct, -1 for wrong rollouts",
        _on_policy_rl("current", "sign"),
        {"aggregation": "token-mean", "rl_mask": "none"},
    ),
    "ppo": _Entry(
        "PPO (Schulman et al. 2017, arXiv 1707.06347)",
        "clipped importance ratio with GAE advantages from a critic",
        _on_policy_rl("old", "gae"),
        {
            "rl_mask": "clip",
            "clip_low": 0.2,
            "clip_high": 0.2,
            "aggregation": "token-mean",
            "gae_gamma": 1.0,
            "gae_lambda": 0.95,
        },
    ),
    "grpo": _Entry(
        "GRPO (DeepSeekMath, arXiv 2402.03300); its KL (k3, 0.04) is off by default: kl_coef=0.04",
        "clipped ratio with the group-normalised reward (R - mean)/std of the question's rollouts",
        _on_policy_rl("old", "group_norm"),
        {
            "rl_mask": "clip",
            "clip_low": 0.2,
            "clip_high": 0.2,
            "aggregation": "seq-mean-token-mean",
            "kl_estimator": "k3",
        },
    ),
    "dr_grpo": _Entry(
        "Dr.GRPO (Liu et al. 2025, arXiv 2503.20783)",
        "GRPO without the std and the length normaliser: R - mean, token sum over a constant length",
        _on_policy_rl("old", "group_centered"),
        {
            "rl_mask": "clip",
            "clip_low": 0.2,
            "clip_high": 0.2,
            "aggregation": "seq-mean-token-sum-norm",
        },
    ),
    "dapo": _Entry(
        "DAPO (Yu et al. 2025, arXiv 2503.14476); dynamic sampling and overlong shaping are trainer options",
        "GRPO with clip-higher (0.2 / 0.28) and token-level mean",
        _on_policy_rl("old", "group_norm"),
        {"rl_mask": "clip", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean"},
    ),
    "cispo": _Entry(
        "CISPO (MiniMax-M1, arXiv 2506.13585): no lower bound (clip_low 1.0), clip_high 0.28",
        "GRPO's advantage with a clipped, stop-gradient importance weight: no token loses its gradient",
        _on_policy_rl("old", "group_norm"),
        {"rl_mask": "cispo", "clip_low": 1.0, "clip_high": 0.28, "aggregation": "token-mean"},
    ),
    "gspo": _Entry(
        "GSPO (Zheng et al. 2025, arXiv 2507.18071)",
        "sequence-level geometric-mean ratio, clipped per sequence at 3e-4 / 4e-4",
        lambda a: (Term("rollout", "sequence", "group_norm", mask=a.rl_mask),),
        {
            "rl_mask": "sequence_clip",
            "clip_low": 3e-4,
            "clip_high": 4e-4,
            "aggregation": "seq-mean-token-mean",
        },
    ),
    "rloo": _Entry(
        "RLOO (Ahmadian et al. 2024, arXiv 2402.14740)",
        "on-policy REINFORCE with the leave-one-out baseline, one action per response",
        _on_policy_rl("current", "rloo"),
        {"rl_mask": "none", "aggregation": "seq-mean-token-sum"},
    ),
    "srft": _Entry(
        "SRFT (Fu et al. 2025, arXiv 2506.19767), as the official HPT code runs it",
        "demos: 0.5 exp(-H) SFT + LUFFY-shaped RL in the group; rollouts: -(0.1 exp(H)) log pi if right, +log pi if wrong",
        lambda a: (
            Term("off_policy", "current", "one", weight="srft_sft", coef=a.sft_coef),
            Term("off_policy", "one", "group_norm", shaping="luffy"),
            Term("rollout", "current", "sign", mask=a.rl_mask, weight="srft_rollout"),
        ),
        {"routes": "off_policy", "group_with_demos": True, "aggregation": "token-mean"},
    ),
    "luffy": _Entry(
        "LUFFY (Yan et al. 2025, arXiv 2504.14945), clip removed as in its scripts",
        "rollouts and the demonstration in one group; the demonstration's pi reshaped by p/(p + 0.1)",
        lambda a: (
            Term("rollout", "old", "group_norm", mask=a.rl_mask),
            Term("off_policy", "one", "group_norm", shaping="luffy"),
        ),
        {"routes": "off_policy", "group_with_demos": True, "aggregation": "token-mean"},
    ),
    "hpt": _Entry(
        "HPT (Lv et al. 2025, arXiv 2509.04419), the released recipe (exp_scripts/train.sh)",
        "per question: SFT on the demonstration if P <= gate_threshold, else on-policy RL (R - mean, no clip, sum/8192)",
        lambda a: (
            Term("sft", "current", "one", coef=a.sft_coef, aggregation="token-mean"),
            Term("rollout", "old", "group_centered", mask=a.rl_mask),
            Term(
                "off_policy", "one", "group_centered", shaping="luffy"
            ),  # three_band's middle band
        ),
        {
            "routes": "switch",
            "group_with_demos": True,
            "rl_mask": "none",
            "aggregation": "token-sum-norm",
            "norm_length": 8192,
            "entropy_coef": 0.001,
            "gate_threshold": 0.0,
        },
    ),
}

_FIXED_FIELDS = ("name", "source", "description", "terms")


def _registered(registry: Any) -> AfterValidator:
    """A name that ``registry`` holds now (parts registered later count too)."""

    def check(value: str) -> str:
        if value not in registry:
            raise ValueError(f"{value!r} is not one of {', '.join(registry.names())}")
        return value

    return AfterValidator(check)


def _soft_gate(value: Any) -> SoftGate:
    """A callable, or a table of (P_max, alpha, beta) rows with ascending P_max ending at >= 1."""
    if callable(value):
        return value
    try:
        rows = tuple((float(p), float(a), float(b)) for p, a, b in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"expected rows of (P_max, alpha, beta) or a callable, got {value!r}"
        ) from None
    if not rows or any(a < 0 or b < 0 for _, a, b in rows):
        raise ValueError("needs at least one row and non-negative alpha, beta")
    if any(later[0] < earlier[0] for earlier, later in zip(rows, rows[1:])) or rows[-1][0] < 1.0:
        raise ValueError("P_max must ascend and the last row must cover P = 1")
    return rows


# What an override may be, on top of its Algorithm field's type (checked strictly: no bool for a
# number, no "0.2" for 0.2); fields not listed take their type as it is.
_LIMITS: dict[str, Any] = {
    "routes": _registered(GATES),
    "clip_low": Field(ge=0, le=1),
    "clip_high": Field(ge=0),
    "dual_clip": Field(gt=1),
    "aggregation": _registered(AGGREGATIONS),
    "norm_length": Field(ge=1),
    "shaping_gamma": Field(gt=0),
    "sft_coef": Field(ge=0),
    "entropy_coef": Field(allow_inf_nan=False),
    "kl_coef": Field(ge=0),
    "kl_estimator": _registered(KL_ESTIMATORS),
    "gate_threshold": Field(ge=0, le=1),
    "gate_upper": Field(ge=0, le=1),
    "soft_gate": PlainValidator(_soft_gate),
    "gae_gamma": Field(ge=0, le=1),
    "gae_lambda": Field(ge=0, le=1),
    "rl_mask": _registered(MASKS),
}
_ALIASES: dict[str, Any] = {"clip": bool}  # clip=True -> rl_mask="clip", clip=False -> "none"


def _override_schema() -> type:
    """The overrides' schema: each Algorithm field's type with its _LIMITS, checked strictly."""
    hints = typing.get_type_hints(Algorithm)
    keys = {
        f.name: Annotated[hints[f.name], _LIMITS[f.name]] if f.name in _LIMITS else hints[f.name]
        for f in dataclasses.fields(Algorithm)
        if f.name not in _FIXED_FIELDS
    }
    schema = TypedDict("AlgorithmOverrides", {**keys, **_ALIASES}, total=False)  # type: ignore[misc]
    schema.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[attr-defined]
    return schema


_OVERRIDES = TypeAdapter(_override_schema())  # the one validator of get_algorithm's overrides


def list_algorithms() -> list[str]:
    """Names of the algorithms in the table, in the paper's order."""
    return list(_TABLE)


def valid_overrides() -> list[str]:
    """Names ``get_algorithm`` accepts as overrides."""
    return sorted(
        [f.name for f in dataclasses.fields(Algorithm) if f.name not in _FIXED_FIELDS]
        + list(_ALIASES)
    )


def _checked(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` validated by the schema; a ConfigError naming the first bad one otherwise.

    The error's ``override`` attribute is the key, for callers that know where it came from.
    """
    valid = valid_overrides()
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            error = ConfigError(
                f"unknown override {key!r} for algorithm {name!r}{hint}; valid: {', '.join(valid)}"
            )
            error.override = key  # type: ignore[attr-defined]
            raise error
    try:
        return _OVERRIDES.validate_python(dict(overrides))
    except ValidationError as failure:
        problem = failure.errors()[0]
        key = str(problem["loc"][0])
        if problem["type"] == "value_error":
            reason = str(problem["ctx"]["error"])
        else:
            reason = f"{problem['msg'][0].lower()}{problem['msg'][1:]}, got {overrides[key]!r}"
        error = ConfigError(f"override {key!r} for algorithm {name!r}: {reason}")
        error.override = key  # type: ignore[attr-defined]
        raise error from None


def get_algorithm(name: str, **overrides: Any) -> Algorithm:
    """A new frozen Algorithm: the table's row ``name`` with ``overrides`` applied, terms rebuilt.

    Raises:
        ConfigError (a ValueError): unknown name or override, or an invalid value; lists valid ones.
    """
    entry = _TABLE.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(list_algorithms())}")
    overrides = _checked(name, overrides)
    if "clip" in overrides:
        overrides.setdefault("rl_mask", "clip" if overrides.pop("clip") else "none")
    algorithm = Algorithm(
        name=name, source=entry.source, description=entry.description, **entry.defaults
    )
    algorithm = dataclasses.replace(algorithm, **overrides)
    algorithm = dataclasses.replace(algorithm, terms=entry.build(algorithm))
    _validate(algorithm)
    return algorithm


def _validate(algorithm: Algorithm) -> None:
    """Every part named by the terms exists; a three-band gate's band is ordered."""
    registries = {
        "reference": REFERENCES,
        "advantage": ADVANTAGES,
        "mask": MASKS,
        "shaping": SHAPINGS,
        "weight": SEQUENCE_WEIGHTS,
    }
    for term in algorithm.terms:
        if term.kind not in KIND_ID:
            raise ConfigError(
                f"algorithm {algorithm.name!r}: unknown sample kind {term.kind!r}; valid: {', '.join(KINDS)}"
            )
        for part, registry in registries.items():
            registry.get(getattr(term, part))
        if term.aggregation is not None:
            AGGREGATIONS.get(term.aggregation)
    if algorithm.routes == "three_band" and algorithm.gate_upper < algorithm.gate_threshold:
        raise ConfigError(
            f"algorithm {algorithm.name!r}: gate_upper {algorithm.gate_upper} is below gate_threshold {algorithm.gate_threshold}"
        )


def outcome_advantages(
    algorithm: Algorithm,
    rewards: Tensor | Sequence[float],
    group: Tensor | Sequence[int],
    is_demo: Tensor | Sequence[bool] | None = None,
    kinds: Tensor | Sequence[Any] | None = None,
) -> Tensor:
    """Each row's outcome advantage under ``algorithm``, [N] float32.

    A row gets the advantage of its kind's (unique) non-"one" advantage term, computed over its
    question's group: the rollouts, plus the off-policy demonstrations when
    ``algorithm.group_with_demos``. Rows whose kind has only "one" terms get 1.0; rows whose kind
    has no term get 0.0 (they contribute nothing). Kinds as in ``unified_loss`` (``kinds``, else
    ``is_demo`` -> the algorithm's demonstration kind).

    Args:
        algorithm: an Algorithm. rewards: [N] float. group: [N] question index of each row.
        is_demo: [N] bool, row is a demonstration. kinds: [N] kind ids or names (overrides is_demo).

    Raises:
        ConfigError: the algorithm's advantage is token-level (GAE: use ``advantage.gae``).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    group = torch.as_tensor(group).reshape(-1).long()
    if group.numel() != rewards.numel():
        raise ValueError(f"group: expected {rewards.numel()} rows, got {group.numel()}")
    kind_ids = resolve_kinds(algorithm, rewards.numel(), is_demo, kinds, rewards.device)
    include = kind_ids == KIND_ID["rollout"]
    if algorithm.group_with_demos:
        include |= kind_ids == KIND_ID["off_policy"]
    out = torch.zeros_like(rewards)
    for kind in algorithm.kinds:
        rows = kind_ids == KIND_ID[kind]
        names = {t.advantage for t in algorithm.terms if t.kind == kind and t.advantage != "one"}
        if len(names) > 1:
            raise ConfigError(
                f"algorithm {algorithm.name!r}: kind {kind!r} mixes advantages {sorted(names)}"
            )
        if not names:
            out[rows] = 1.0
            continue
        (estimator,) = names
        if ADVANTAGES.trait(estimator, "token_level"):
            raise ConfigError(
                f"algorithm {algorithm.name!r} uses the token-level {estimator!r} advantage: compute it with "
                "hpt.estimator.advantage.gae(values, rewards, response_mask, gamma, lam)"
            )
        out[rows] = get_advantage(estimator)(rewards, group, include)[rows]
    return out


# ---- the table, printed from the code --------------------------------------------------------

_KIND_LABEL = {"rollout": "on", "sft": "sft", "off_policy": "off"}


def _mask_symbol(algorithm: Algorithm, mask: str) -> str:
    bounds = f"[{1 - algorithm.clip_low:g}, {1 + algorithm.clip_high:g}]"
    dual = f", dual {algorithm.dual_clip:g}" if algorithm.dual_clip else ""
    return MASKS.trait(mask, "symbol", mask).format(bounds=bounds, dual=dual)


def _per_term(algorithm: Algorithm, describe: Callable[[Term], str]) -> str:
    """One cell: each term's part, prefixed by its kind when the terms differ."""
    cells = [(_KIND_LABEL[t.kind], describe(t)) for t in algorithm.terms]
    if len({text for _, text in cells}) == 1:
        return cells[0][1]
    return "; ".join(dict.fromkeys(f"{label}: {text}" for label, text in cells))


def _advantage_text(term: Term) -> str:
    text = ADVANTAGES.trait(term.advantage, "symbol", term.advantage)
    return text if term.weight == "none" else f"{text} x {term.weight}"


def _gate_text(algorithm: Algorithm) -> str:
    return {
        "switch": f"switch: SFT if P <= {algorithm.gate_threshold:g}, else RL",
        "three_band": f"SFT if P <= {algorithm.gate_threshold:g}, off-policy if P <= {algorithm.gate_upper:g}, else RL",
        "soft": "soft: alpha, beta = soft_gate(P)",
    }.get(algorithm.routes, "")


def table_row(a: Algorithm) -> dict[str, str]:
    """One algorithm's row of the table (with its overrides applied)."""
    kinds = ("rollout", "sft", "off_policy")
    data = dict.fromkeys(_KIND_LABEL[k] if k == "rollout" else "off" for k in kinds if k in a.kinds)
    advantage = _per_term(a, _advantage_text)
    if a.group_with_demos and "off_policy" in a.kinds:
        advantage += " (group: rollouts + demo)"
    aggregation = _per_term(a, lambda t: t.aggregation or a.aggregation)
    if a.norm_length and "token-sum-norm" in aggregation:
        aggregation += f" (/{a.norm_length})"
    shaping = f"p/(p+{a.shaping_gamma:g})"
    return {
        "name": a.name,
        "data": " + ".join(data),
        "pi_ref": _per_term(a, lambda t: REFERENCES.trait(t.reference, "symbol", t.reference)),
        "A_hat": advantage,
        "mask": _per_term(a, lambda t: _mask_symbol(a, t.mask)),
        "shaping": _per_term(a, lambda t: shaping if t.shaping == "luffy" else "none"),
        "aggregation": aggregation,
        "gate": _gate_text(a),
        "source": a.source,
    }


def table_rows() -> list[dict[str, str]]:
    """The paper's table from the code: one dict per algorithm (name, data, pi_ref, A_hat, mask,
    shaping, aggregation, gate, source)."""
    return [table_row(get_algorithm(name)) for name in list_algorithms()]


def main(argv: list[str] | None = None) -> int:
    """``hpt algorithms``: print the table of algorithms and their four parts, from the code."""
    parser = argparse.ArgumentParser(
        prog="hpt algorithms", description="the table of algorithms, from the code"
    )
    parser.add_argument(
        "--sources", action="store_true", help="also show each algorithm's source paper"
    )
    args = parser.parse_args(argv or [])
    from rich.console import Console
    from rich.table import Table

    columns = ["name", "data", "pi_ref", "A_hat", "mask", "shaping", "aggregation", "gate"]
    if args.sources:
        columns.append("source")
    table = Table(
        title="Algorithms as instances of the UPGE: 1_stable * (1/pi_ref) * A_hat * grad pi_theta"
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in table_rows():
        table.add_row(*(row[column] for column in columns))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    return 0


__all__ = [
    "Algorithm",
    "Term",
    "DEFAULT_SOFT_GATE",
    "get_algorithm",
    "list_algorithms",
    "outcome_advantages",
    "table_rows",
    "valid_overrides",
    "main",
]
