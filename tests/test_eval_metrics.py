"""avg@k, unbiased pass@k and maj@k; the benchmark registry; the paper-layout tables."""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpt.errors import ConfigError, DataError
from hpt.eval.benchmarks import BENCHMARKS, PAPER_COLUMNS, get_benchmark, resolve_benchmarks
from hpt.eval.metrics import (
    avg_at_k,
    kind_averages,
    maj_at_k,
    majority_answer,
    metric_value,
    pass_at_k,
    pass_at_k_mean,
    pass_ks,
    summarize,
)
from hpt.eval.report import load_results, markdown_table, table

SHARED_BENCHMARKS = "/work/shared/benchmarks"


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Exact fraction of the k-subsets of n samples (c correct) that hold a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(
                float(brute_force_pass_at_k(n, c, k)), abs=1e-12
            )


@given(n=st.integers(1, 300), data=st.data())
def test_pass_at_k_matches_binomial_formula(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-9)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) overflows a float; the product form does not.
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(1 - (1000 * 999 * 998) / (2000 * 1999 * 1998), rel=1e-9)
    assert pass_at_k(2000, 0, 1000) == 0.0


def test_pass_at_1_is_the_fraction_correct_and_bad_counts_raise():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    for bad in ((0, 0, 1), (4, 5, 1), (4, 2, 5), (4, 2, 0), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_ks_are_powers_of_two_and_k_itself():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(0) == []


def test_avg_at_k_is_the_mean_over_all_samples():
    scores = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert avg_at_k(scores) == pytest.approx(5 / 12)
    assert pass_at_k_mean(scores, 1) == pytest.approx(5 / 12)  # pass@1 == avg@k (unbiased)
    assert pass_at_k_mean(scores, 4) == pytest.approx(2 / 3)
    assert avg_at_k([]) == 0.0


def test_maj_at_k_votes_on_normalised_answers_and_breaks_ties_by_first_appearance():
    answers = [
        ["5", " 5 ", "$5$", "7"],  # 5 wins 3-1; its verdict is correct
        ["7", "7", "5", None],  # 7 wins; wrong
        ["2", "3", "3", "2"],  # tie: "2" appeared first
        [None, None, None, None],  # no answer: 0
    ]
    scores = [[1, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert majority_answer(answers[2]) == 0
    assert majority_answer(["3", "2", "2", "3"]) == 0
    assert majority_answer(["x", "y", "y"]) == 1
    assert majority_answer(answers[3]) is None
    assert maj_at_k(answers, scores) == pytest.approx((1 + 0 + 1 + 0) / 4)
    with pytest.raises(ValueError):
        maj_at_k(answers, scores[:2])


def test_summarize_groups_records_and_ignores_samples_beyond_k():
    records = [
        {
            "question_id": q,
            "sample": j,
            "verdict": v,
            "extracted": a,
            "response_tokens": 10 * (j + 1),
            "finish_reason": "length" if j == 0 else "stop",
            "boxed": a is not None,
        }
        for q, rows in {
            "a": [(1, "4"), (0, "5"), (1, "4")],
            "b": [(0, None), (0, "1"), (1, "2")],
        }.items()
        for j, (v, a) in enumerate(rows)
    ]
    full = summarize(records)
    assert full["questions"] == 2 and full["k"] == 3 and full["samples"] == 6
    assert full["avg@k"] == pytest.approx(3 / 6)
    assert full["pass@k"] == {
        "1": pytest.approx(0.5),
        "2": pytest.approx((1 + 2 / 3) / 2),  # a: 2 of 3 right; b: 1 of 3
        "3": 1.0,
    }
    assert full["maj@k"] == pytest.approx(0.5)  # a: "4" (right); b: tie "1" first (wrong)
    assert full["no_boxed"] == pytest.approx(1 / 6)
    assert full["truncated"] == pytest.approx(2 / 6)
    assert full["response_tokens"] == pytest.approx(20)
    cut = summarize(records, k=2)
    assert cut["k"] == 2 and cut["samples"] == 4 and cut["avg@k"] == pytest.approx(1 / 4)


def test_metric_value_and_kind_averages():
    per = {
        "aime24": {"kind": "id", "avg@k": 0.2, "maj@k": 0.3, "pass@k": {"1": 0.2, "4": 0.5}},
        "math500": {"kind": "id", "avg@k": 0.6, "maj@k": 0.7, "pass@k": {"1": 0.6, "4": 0.9}},
        "gpqa": {"kind": "ood", "avg@k": 0.3, "maj@k": 0.3, "pass@k": {"1": 0.3, "4": 0.4}},
        "mine": {"kind": "custom", "avg@k": 1.0, "maj@k": 1.0, "pass@k": {"1": 1.0}},
    }
    assert metric_value(per["aime24"], "pass@k") == 0.5
    assert metric_value(per["aime24"], "pass@4") == 0.5
    assert metric_value(per["aime24"], "pass@8") is None
    with pytest.raises(ValueError):
        metric_value(per["aime24"], "best@k")
    averages = kind_averages(per)
    assert averages["id"]["value"] == pytest.approx(0.4) and averages["id"]["benchmarks"] == [
        "aime24",
        "math500",
    ]
    assert averages["ood"]["value"] == pytest.approx(0.3)
    assert kind_averages(per, "maj@k")["id"]["value"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------- registry


def test_registry_covers_the_papers_suite():
    assert list(BENCHMARKS) == [
        "aime24",
        "aime25",
        "amc23",
        "math500",
        "minerva",
        "olympiadbench",
        "arc_c",
        "gpqa",
    ]
    assert {b.reward for b in BENCHMARKS.values() if b.kind == "id"} == {"math"}
    assert {b.name for b in BENCHMARKS.values() if b.reward == "choice"} == {"gpqa", "arc_c"}
    labels = [label for label, _ in PAPER_COLUMNS]
    assert labels == [
        "AIME24",
        "AIME25",
        "AMC",
        "MATH-500",
        "Minerva",
        "Olympiad",
        "avg",
        "ARC-c",
        "GPQA",
        "OOD avg",
    ]
    assert get_benchmark("AMC").name == "amc23" and get_benchmark("MATH-500").name == "math500"
    with pytest.raises(ConfigError, match="unknown benchmark 'aime99'.*aime24"):
        get_benchmark("aime99")


def test_resolve_names_folders_files_and_a_benchmark_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HPT_BENCHMARK_DIR", raising=False)
    (tmp_path / "MATH-500").mkdir()
    (tmp_path / "MATH-500" / "test.json").write_text('[{"prompt": "1+1?", "answer": "2"}]')
    (tmp_path / "GPQA").mkdir()
    (tmp_path / "GPQA" / "test.jsonl").write_text('{"prompt": "A or B?", "answer": "A"}\n')
    custom = tmp_path / "mine.jsonl"
    custom.write_text('{"question": "2+2?", "final": "4"}\n')

    found = resolve_benchmarks([str(tmp_path)])
    assert [(b.name, b.kind, b.reward) for b in found] == [
        ("math500", "id", "math"),
        ("gpqa", "ood", "choice"),
    ]
    assert found[1].source == str(tmp_path / "GPQA" / "test.jsonl")

    by_name = resolve_benchmarks(["math500", "gpqa"], benchmark_dir=tmp_path)
    assert [b.source for b in by_name] == [
        str(tmp_path / "MATH-500" / "test.json"),
        str(tmp_path / "GPQA" / "test.jsonl"),
    ]
    monkeypatch.setenv("HPT_BENCHMARK_DIR", str(tmp_path))
    assert resolve_benchmarks(["gpqa"])[0].source == str(tmp_path / "GPQA" / "test.jsonl")
    monkeypatch.delenv("HPT_BENCHMARK_DIR")

    (folder_file,) = resolve_benchmarks([str(tmp_path / "MATH-500" / "test.json")])
    assert folder_file.name == "math500"
    (mine,) = resolve_benchmarks(
        [str(custom)], reward="choice", fields={"prompt": "question", "answer": "final"}
    )
    assert (mine.name, mine.kind, mine.reward, dict(mine.fields)) == (
        "mine",
        "custom",
        "choice",
        {"prompt": "question", "answer": "final"},
    )

    # not found locally: the Hugging Face id for the math sets, a clear error for the choice sets
    assert resolve_benchmarks(["aime25"], benchmark_dir=tmp_path)[0].source == "math-ai/aime25"
    with pytest.raises(DataError, match="arc_c.*no local copy"):
        resolve_benchmarks(["arc_c"], benchmark_dir=tmp_path)
    with pytest.raises(DataError, match="no such benchmark file"):
        resolve_benchmarks([str(tmp_path / "missing.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no benchmark data"):
        resolve_benchmarks([str(tmp_path / "empty")])
    with pytest.raises(ConfigError):
        resolve_benchmarks([])


@pytest.mark.skipif(
    not __import__("os").path.isdir(SHARED_BENCHMARKS), reason="shared benchmarks absent"
)
def test_shared_benchmark_directory_holds_all_eight_sets():
    assert [b.name for b in resolve_benchmarks([SHARED_BENCHMARKS])] == list(BENCHMARKS)


# ---------------------------------------------------------------------------------- tables


def _run(name, **values):
    kinds = {b.name: b.kind for b in BENCHMARKS.values()}
    return {
        "name": name,
        "benchmarks": {
            b: {
                "kind": kinds.get(b, "custom"),
                "avg@k": v,
                "maj@k": v,
                "pass@k": {"1": v, "2": min(1.0, 2 * v)},
            }
            for b, v in values.items()
        },
    }


def test_markdown_table_has_the_papers_layout_and_averages(tmp_path):
    runs = [
        _run("base", aime24=0.1, math500=0.5, gpqa=0.25),
        _run("hpt", aime24=0.3, math500=0.7, arc_c=0.8, mine=1.0),
    ]
    text = markdown_table(runs)
    lines = text.strip().splitlines()
    assert (
        lines[0]
        == "| method | AIME24 | AIME25 | AMC | MATH-500 | Minerva | Olympiad | avg | ARC-c | GPQA | OOD avg | mine |"
    )
    assert lines[2] == "| base | 10.0 | - | - | 50.0 | - | - | 30.0 | - | 25.0 | 25.0 | - |"
    assert lines[3] == "| hpt | 30.0 | - | - | 70.0 | - | - | 50.0 | 80.0 | - | 80.0 | 100.0 |"
    columns, rows, names = table(runs, "pass@2")
    assert names == ["base", "hpt"] and rows[0][0] == pytest.approx(0.2)


def test_a_table_of_custom_sets_only_has_no_empty_paper_columns():
    runs = [_run("base", held=0.25), _run("hpt", held=0.5, mine=1.0)]
    lines = markdown_table(runs).strip().splitlines()
    assert lines[0] == "| method | held | mine |"
    assert lines[2:] == ["| base | 25.0 | - |", "| hpt | 50.0 | 100.0 |"]


def test_report_cli_merges_results_as_rows(tmp_path, capsys):
    from hpt.cli import main

    for run in (_run("sft", aime24=0.2), _run("grpo", aime24=0.4)):
        (tmp_path / run["name"]).mkdir()
        (tmp_path / run["name"] / "results.json").write_text(json.dumps(run))
    out = tmp_path / "report.md"
    assert (
        main(
            [
                "report",
                str(tmp_path / "sft"),
                str(tmp_path / "grpo" / "results.json"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| sft | 20.0 |") and lines[3].startswith("| grpo | 40.0 |")
    assert "sft" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "sft"), "--names", "a", "b"]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "bad.json").write_text("{")
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("hpt report: error:") for line in err)
    assert load_results(tmp_path / "sft")["name"] == "sft"


def test_cell_formats_mean_spread_and_missing_values():
    from hpt.eval.report import cell

    assert cell(0.85, math.sqrt(0.005)) == "85.0 ± 7.1"
    assert cell(0.5) == "50.0" and cell(0.5, 0.0) == "50.0" and cell(0.5, math.nan) == "50.0"
    assert cell(None) == "-" and cell(math.nan, 0.1) == "-"
    assert cell(2000.0, 1000.0, scale=1e-3, fmt=".0f") == "2 ± 1"


def test_rich_and_markdown_render_the_same_rows(capsys):
    from rich.console import Console

    from hpt.eval.report import print_rows, results_rows, to_markdown

    runs = [_run("base", aime24=0.1, gpqa=0.25), _run("hpt", aime24=0.3, arc_c=0.8)]
    header, rows = results_rows(runs)
    assert to_markdown(header, rows) == markdown_table(runs)
    console = Console(record=True, width=200)
    print_rows(header, rows, "accuracy", bold=["avg"], console=console)
    screen = console.export_text().splitlines()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in re.split("[│┃]", line)[1:-1]]

    assert screen[0].strip() == "accuracy" and cells(screen[2]) == header
    assert [cells(line) for line in screen[4:6]] == rows and len(screen) == 7
    assert "│ hpt    │   30.0 │" in screen[5]  # names left-aligned, numbers right-aligned


def test_draw_panels_writes_one_png_a_row_of_panels(tmp_path):
    import struct

    from hpt.eval.plots import draw_panels, plot_pass_at_k

    panels = {"a": {"x": ([1, 2, 3], [0.1, 0.2, 0.3]), "empty": ([], [])}, "b": {}}
    path = draw_panels(tmp_path / "deep" / "f.png", panels, ylabel="y", panel_size=(4.0, 3.0))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk: pixels at 120 dpi
    assert (width, height) == (2 * 4 * 120, 3 * 120)
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.png"]  # no temporary left
    one = plot_pass_at_k({"m": {"pass@k": {"2": 0.5, "1": 0.25}}}, tmp_path / "p.png")
    assert struct.unpack(">II", one.read_bytes()[16:24]) == (int(6.4 * 120), 4 * 120)
