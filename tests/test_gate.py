"""HPT's gate: routes for every count under each gate kind; the soft gate reaches the gradient."""

from __future__ import annotations

import pytest
import torch

import hpt
from hpt.algorithms import get_algorithm
from hpt.errors import ConfigError
from hpt.estimator.unified import KIND_ID, unified_loss
from hpt.gate import GATES, assignments, route, route_weights

N = 8
ALL_COUNTS = list(range(N + 1))


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 1.0])
def test_switch_routes_every_count(threshold):
    algorithm = get_algorithm("hpt", gate_threshold=threshold)
    routes = hpt.route(algorithm, torch.tensor(ALL_COUNTS), N)
    assert routes == ["sft" if c / N <= threshold else "rl" for c in ALL_COUNTS]
    alpha, beta = route_weights(algorithm, ALL_COUNTS, N)
    assert alpha.tolist() == [0.0 if r == "sft" else 1.0 for r in routes]
    assert beta.tolist() == [1.0 if r == "sft" else 0.0 for r in routes]


def test_switch_default_is_sft_only_when_all_rollouts_fail():
    assert route(get_algorithm("hpt"), ALL_COUNTS, N) == ["sft"] + ["rl"] * N
    assert (
        route(get_algorithm("hpt", gate_threshold=0.25), ALL_COUNTS, N) == ["sft"] * 3 + ["rl"] * 6
    )  # 2 of 8


def test_three_band_routes_every_count():
    algorithm = get_algorithm("hpt", routes="three_band", gate_threshold=0.125, gate_upper=0.5)
    routes = route(algorithm, ALL_COUNTS, N)
    assert routes == [
        "sft",
        "sft",
        "off_policy",
        "off_policy",
        "off_policy",
        "rl",
        "rl",
        "rl",
        "rl",
    ]
    plan = assignments(algorithm, ALL_COUNTS, N)
    assert [p.demo_kind for p in plan] == ["sft", "sft"] + ["off_policy"] * 3 + [None] * 4
    assert [p.rollout_weight for p in plan] == [0.0, 0.0] + [1.0] * 7


def test_soft_gate_table_and_callable():
    table = ((0.0, 0.0, 1.0), (0.5, 0.6, 0.4), (1.0, 1.0, 0.0))
    algorithm = get_algorithm("hpt", routes="soft", soft_gate=table)
    alpha, beta = route_weights(algorithm, ALL_COUNTS, N)
    assert alpha.tolist() == pytest.approx([0.0] + [0.6] * 4 + [1.0] * 4)
    assert beta.tolist() == pytest.approx([1.0] + [0.4] * 4 + [0.0] * 4)
    assert route(algorithm, ALL_COUNTS, N) == ["sft"] + ["rl"] * 8  # the larger side
    plan = assignments(algorithm, ALL_COUNTS, N)
    assert plan[2].rollout_weight == pytest.approx(0.6) and plan[2].demo_kind == "sft"
    assert plan[8].demo_kind is None
    smooth = get_algorithm("hpt", routes="soft", soft_gate=lambda p: (p, 1 - p))
    alpha, beta = route_weights(smooth, ALL_COUNTS, N)
    torch.testing.assert_close(alpha, torch.tensor(ALL_COUNTS) / N)
    assert route(smooth, [1, 7], N) == ["sft", "rl"]


@pytest.mark.parametrize(
    "name,fixed", [("grpo", "rl"), ("sft", "sft"), ("luffy", "off_policy"), ("srft", "off_policy")]
)
def test_algorithms_without_a_gate_route_every_question_the_same(name, fixed):
    assert route(get_algorithm(name), ALL_COUNTS, N) == [fixed] * (N + 1)


def test_bad_counts():
    with pytest.raises(ConfigError):
        route(get_algorithm("hpt"), [9], N)
    with pytest.raises(ConfigError):
        route(get_algorithm("hpt"), [0], 0)
    assert set(GATES.names()) == {"rl", "sft", "off_policy", "switch", "three_band", "soft"}


def test_soft_gate_coefficients_reach_the_gradient():
    """alpha / beta from the soft gate, passed as row_weights, scale each side's gradient."""
    algorithm = get_algorithm("hpt", routes="soft")
    alpha, beta = route_weights(algorithm, [2, 3], 8)  # both mix: (1.0, 0.5) from the default table
    assert alpha.tolist() == [1.0, 1.0] and beta.tolist() == [0.5, 0.5]
    g = torch.Generator().manual_seed(0)
    # question 0: 4 rollouts + 1 demonstration, question 1: the same
    rows, length = 10, 6
    lp = (torch.rand(rows, length, generator=g, dtype=torch.float64) * 0.9 + 0.05).log()
    old = lp + 0.2 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = torch.ones(rows, length, dtype=torch.bool)
    question = torch.arange(2).repeat_interleave(5)
    demo = torch.arange(rows) % 5 == 4
    kinds = torch.where(demo, KIND_ID["sft"], KIND_ID["rollout"])
    rewards = torch.randint(0, 2, (rows,), generator=g).double()
    adv = hpt.outcome_advantages(algorithm, rewards, question, kinds=kinds)
    weights = torch.where(demo, beta[question], alpha[question])

    def grad(row_weights):
        x = lp.clone().requires_grad_(True)
        out = unified_loss(algorithm, x, old, adv, mask, kinds=kinds, row_weights=row_weights)
        return torch.autograd.grad(out.loss, x)[0]

    plain = grad(None)
    weighted = grad(weights)
    torch.testing.assert_close(
        weighted[~demo], plain[~demo] * alpha[question][~demo, None].double()
    )
    torch.testing.assert_close(weighted[demo], plain[demo] * 0.5)
    assert not torch.allclose(weighted, plain)
