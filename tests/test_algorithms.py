"""The algorithm table: names, defaults from the source papers, overrides, errors, the CLI table."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import hpt
from hpt.algorithms import (
    Algorithm,
    Term,
    get_algorithm,
    outcome_advantages,
    table_rows,
    valid_overrides,
)
from hpt.errors import ConfigError

NAMES = [
    "sft",
    "reinforce",
    "ppo",
    "grpo",
    "dr_grpo",
    "dapo",
    "cispo",
    "gspo",
    "rloo",
    "srft",
    "luffy",
    "hpt",
]
COMMON_OVERRIDES = {
    "clip_low": 0.1,
    "clip_high": 0.3,
    "dual_clip": 3.0,
    "aggregation": "seq-mean-token-sum",
    "gate_threshold": 0.25,
    "shaping_gamma": 0.2,
    "sft_coef": 0.3,
    "entropy_coef": 0.01,
}


def test_names_and_public_api():
    assert hpt.list_algorithms() == NAMES
    for name in NAMES:
        algorithm = hpt.get_algorithm(name)
        assert isinstance(algorithm, hpt.Algorithm) and algorithm.name == name
        assert algorithm.terms and all(isinstance(t, hpt.Term) for t in algorithm.terms)
        assert algorithm.source and algorithm.description


@pytest.mark.parametrize("name", NAMES)
def test_common_overrides_are_accepted_and_frozen(name):
    algorithm = get_algorithm(name, **COMMON_OVERRIDES)
    for key, value in COMMON_OVERRIDES.items():
        assert getattr(algorithm, key) == value
    with pytest.raises(dataclasses.FrozenInstanceError):
        algorithm.clip_low = 0.5  # type: ignore[misc]
    assert get_algorithm(name) != algorithm  # a new object; the table is untouched
    sft_terms = [t for t in algorithm.terms if t.weight == "srft_sft" or t.kind == "sft"]
    assert all(t.coef == 0.3 for t in sft_terms)


def test_unknown_name_and_override_list_valid_ones():
    with pytest.raises(ValueError) as error:
        get_algorithm("trpo")
    assert isinstance(error.value, ConfigError)
    assert all(name in str(error.value) for name in NAMES)
    with pytest.raises(ValueError) as error:
        get_algorithm("grpo", clip_ratio=0.2)
    message = str(error.value)
    assert "'clip_ratio'" in message and all(key in message for key in COMMON_OVERRIDES)
    for bad in [
        {"aggregation": "mean"},
        {"clip_low": "x"},
        {"clip_low": 1.5},
        {"dual_clip": 0.9},
        {"routes": "sometimes"},
        {"kl_estimator": "k4"},
        {"rl_mask": "ppo"},
        {"routes": "three_band", "gate_threshold": 0.6, "gate_upper": 0.5},
        {"soft_gate": [(0.5, 1.0, 0.0)]},
        {"norm_length": 0},
        {"clip": "yes"},
    ]:
        with pytest.raises(ConfigError):
            get_algorithm("hpt", **bad)


def test_override_errors_name_the_override_the_value_and_the_rule():
    cases = {
        "clip_low": (1.5, "less than or equal to 1, got 1.5"),
        "dual_clip": (0.9, "greater than 1, got 0.9"),
        "sft_coef": (True, "valid number, got True"),  # a bool is not a number
        "entropy_coef": (float("nan"), "finite number"),
        "aggregation": ("mean", "'mean' is not one of token-mean"),
        "clip": ("yes", "valid boolean, got 'yes'"),
    }
    for key, (value, fragment) in cases.items():
        with pytest.raises(ConfigError) as error:
            get_algorithm("grpo", **{key: value})
        message = str(error.value)
        assert (
            message.startswith(f"override {key!r} for algorithm 'grpo': ") and fragment in message
        )
        assert error.value.override == key  # config.py names `algo.<key>` and its line with it
    with pytest.raises(ConfigError, match="did you mean 'clip_high'"):
        get_algorithm("grpo", clip_hihg=0.3)


def test_overrides_are_typed_by_the_one_schema():
    algorithm = get_algorithm("grpo", clip_low=0, norm_length=None, dual_clip=3, clip=False)
    assert (algorithm.clip_low, algorithm.dual_clip, algorithm.rl_mask) == (0.0, 3.0, "none")
    assert type(algorithm.clip_low) is float and type(algorithm.dual_clip) is float
    assert get_algorithm("hpt", soft_gate=[[0.5, 1, 0], [1, 1, 1]]).soft_gate == (
        (0.5, 1.0, 0.0),
        (1.0, 1.0, 1.0),
    )
    settable = {f.name for f in dataclasses.fields(Algorithm)} - {
        "name",
        "source",
        "description",
        "terms",
    }
    assert set(valid_overrides()) == settable | {"clip"}


def parts(term):
    return (term.kind, term.reference, term.advantage, term.mask)


def test_the_papers_table():
    grpo, ppo, sft = get_algorithm("grpo"), get_algorithm("ppo"), get_algorithm("sft")
    assert sft.terms == (Term("sft", "current", "one"),) and sft.routes == "sft"
    assert ppo.terms[0].advantage == "gae" and ppo.needs_values and ppo.terms[0].mask == "clip"
    assert (grpo.terms[0].reference, grpo.terms[0].advantage, grpo.terms[0].mask) == (
        "old",
        "group_norm",
        "clip",
    )
    assert parts(get_algorithm("reinforce").terms[0]) == ("rollout", "current", "sign", "none")
    dapo = get_algorithm("dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.aggregation) == (0.2, 0.28, "token-mean")
    assert get_algorithm("cispo").terms[0].mask == "cispo"
    gspo = get_algorithm("gspo")
    assert (gspo.clip_low, gspo.clip_high, gspo.aggregation) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert parts(gspo.terms[0]) == ("rollout", "sequence", "group_norm", "sequence_clip")
    assert get_algorithm("rloo").terms[0].advantage == "rloo"
    assert get_algorithm("dr_grpo").aggregation == "seq-mean-token-sum-norm"


def test_hpt_is_the_released_recipe():
    a = get_algorithm("hpt")
    assert a.routes == "switch" and a.gate_threshold == 0.0
    sft = [t for t in a.terms if t.kind == "sft"]
    rollout = [t for t in a.terms if t.kind == "rollout"]
    assert sft == [Term("sft", "current", "one", coef=1.0, aggregation="token-mean")]
    assert rollout == [Term("rollout", "old", "group_centered", mask="none")]
    assert (a.aggregation, a.norm_length, a.entropy_coef, a.kl_coef) == (
        "token-sum-norm",
        8192,
        0.001,
        0.0,
    )
    assert not a.needs_reference_model and a.needs_entropy and a.demo_kind == "sft"
    assert get_algorithm("hpt", clip=True).terms[1].mask == "clip"
    assert get_algorithm("hpt", rl_mask="clip").terms[1].mask == "clip"
    assert get_algorithm("hpt", sft_coef=0.3).terms[0].coef == 0.3


def test_luffy_and_srft():
    luffy = get_algorithm("luffy")
    assert (
        luffy.routes == "off_policy" and luffy.group_with_demos and luffy.demo_kind == "off_policy"
    )
    assert Term("rollout", "old", "group_norm", mask="none") in luffy.terms
    assert Term("off_policy", "one", "group_norm", shaping="luffy") in luffy.terms
    srft = get_algorithm("srft")
    assert {t.weight for t in srft.terms} == {"srft_sft", "srft_rollout", "none"}
    assert srft.needs_entropy and srft.group_with_demos


def test_needs_properties():
    assert get_algorithm("sft").needs_demonstrations and not get_algorithm("sft").needs_rollouts
    assert not get_algorithm("sft").needs_old_logprobs
    assert (
        get_algorithm("grpo").needs_old_logprobs and not get_algorithm("grpo").needs_demonstrations
    )
    assert not get_algorithm("reinforce").needs_old_logprobs
    assert get_algorithm("grpo", kl_coef=0.04).needs_reference_model


def test_outcome_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    grpo = outcome_advantages(get_algorithm("grpo"), rewards, group)
    first = rewards[:4]
    torch.testing.assert_close(grpo[:4], (first - first.mean()) / (first.std() + 1e-6))
    torch.testing.assert_close(
        outcome_advantages(get_algorithm("dr_grpo"), rewards, group)[:4], first - 0.25
    )
    torch.testing.assert_close(
        outcome_advantages(get_algorithm("reinforce"), rewards, group), 2 * rewards - 1
    )
    # HPT: SFT rows get 1; rollouts are centred over rollouts only (the SFT row is not in the group)
    is_demo = torch.tensor([False, False, False, True, False, False, False, True])
    hpt_adv = outcome_advantages(get_algorithm("hpt"), rewards, group, is_demo=is_demo)
    assert hpt_adv[3] == 1.0 and hpt_adv[7] == 1.0
    torch.testing.assert_close(hpt_adv[:3], torch.tensor([1.0, 0.0, 0.0]) - 1 / 3)
    # LUFFY: the demonstration joins its group's statistics
    luffy = outcome_advantages(get_algorithm("luffy"), rewards, group, is_demo=is_demo)
    torch.testing.assert_close(luffy[:4], (first - first.mean()) / (first.std() + 1e-6))
    # kinds by name; rows of kinds without terms get 0
    zeroed = outcome_advantages(get_algorithm("grpo"), rewards, group, kinds=["sft"] * 8)
    assert torch.all(zeroed == 0)
    assert torch.all(outcome_advantages(get_algorithm("sft"), rewards, group) == 1)
    with pytest.raises(ConfigError, match="gae"):
        outcome_advantages(get_algorithm("ppo"), rewards, group)


def test_table_rows_and_cli(capsys):
    rows = table_rows()
    assert [r["name"] for r in rows] == NAMES
    for row in rows:
        assert set(row) >= {
            "name",
            "data",
            "pi_ref",
            "A_hat",
            "mask",
            "shaping",
            "aggregation",
            "gate",
        }
    by_name = {r["name"]: r for r in rows}
    assert by_name["grpo"]["pi_ref"] == "pi_old" and by_name["sft"]["A_hat"] == "1"
    assert by_name["hpt"]["gate"].startswith("switch") and by_name["grpo"]["gate"] == ""
    assert "p/(p+0.1)" in by_name["luffy"]["shaping"]
    from hpt.cli import main

    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    for column in ["pi_ref", "A_hat", "mask", "aggregation", "gate"]:
        assert column in out


def test_no_code_outside_the_table_branches_on_algorithm_names():
    """No comparison (==, !=, in) with an algorithm-name literal anywhere in the package but the
    table ("sft" is also a sample kind and a route, so it is allowed)."""
    root = Path(hpt.__file__).parent
    names = set(NAMES) - {"sft"}
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "algorithms.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                literals = {
                    c.value
                    for side in [node.left, *node.comparators]
                    for c in ast.walk(side)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                }
                if literals & names:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders


def test_algorithm_dataclass_has_the_contract_fields():
    fields = {f.name for f in dataclasses.fields(Algorithm)}
    assert fields >= {
        "name", "source", "description", "terms", "routes", "group_with_demos", "clip_low", "clip_high",
        "dual_clip", "aggregation", "norm_length", "shaping_gamma", "sft_coef", "entropy_coef", "kl_coef",
        "kl_estimator", "gate_threshold", "gate_upper", "soft_gate", "gae_gamma", "gae_lambda",
    }  # fmt: skip
    assert not fields & {"ppo_epochs", "lr"}  # the trainer's config owns these


def test_public_api_is_exported_and_import_stays_light():
    """`import hpt` exposes the contract's names and loads no heavy library until used."""
    import subprocess
    import sys

    import hpt

    assert sorted(hpt.__all__) == sorted([*hpt._EXPORTS, "__version__"])
    for name in (
        "list_algorithms",
        "get_algorithm",
        "outcome_advantages",
        "unified_loss",
        "route",
        "get_reward",
    ):
        assert callable(getattr(hpt, name))
    code = "import sys, hpt; print(sorted(m for m in ('transformers', 'datasets', 'math_verify', 'matplotlib') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_readme_algorithm_table_is_the_code_s():
    """README's table of algorithms is `hpt algorithms`' output, row for row."""
    from pathlib import Path

    from hpt.algorithms import table_rows

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    columns = ["name", "data", "pi_ref", "A_hat", "mask", "shaping", "aggregation", "gate"]
    for row in table_rows():
        line = "| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |"
        assert line in readme, f"README's row for {row['name']} is stale: {line}"
