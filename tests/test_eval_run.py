"""End to end: `hpt eval` on the tiny model over small local benchmark files.

The written files must agree with each other: every metric in results.json / results.md is
recomputed here from samples.jsonl by brute force (not with hpt.eval.metrics). A scripted engine
(responses chosen per question) gives non-trivial scores; the real HFEngine runs the CLI path.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpt.cli import main
from hpt.data import Question
from hpt.eval import evaluate, evaluate_questions, make_builder, read_samples
from hpt.eval.prompts import CHOICE_INSTRUCTION, MATH_INSTRUCTION, template_adds_instruction
from hpt.eval.report import results_rows, to_markdown
from hpt.rollout import Rollout, SamplingParams

MATH_ROWS = [  # a custom file with its own field names: --field prompt=question --field answer=final
    {"question": "What is 2+3?", "final": "5", "uid": "q-a"},
    {"question": "What is 4+4?", "final": "8", "uid": "q-b"},
    {"question": "What is 9-6?", "final": "3", "uid": "q-c"},
]
AMC_ROWS = [
    {"prompt": "Compute 7*6.", "answer": "42"},
    {"prompt": "Compute 1/2+1/2.", "answer": "\\boxed{1}"},
]
CHOICE_ROWS = [  # invented items (never real GPQA ones)
    {"prompt": "Which is a prime?\n\nA. 4\nB. 6\nC. 7\nD. 9", "answer": "C"},
    {"prompt": "Which is even?\n\nA. 3\nB. 8\nC. 5\nD. 1", "answer": "B"},
]
ARC_SYSTEM = "You are a careful science tutor."
ARC_ROWS = [
    {
        "question": "Water boils at sea level at about which temperature?\nA) 50 C\nB) 100 C\nC) 150 C\nD) 0 C",
        "answer": "B",
    },
    {"question": "Which is a mammal?\nA) Shark\nB) Frog\nC) Whale\nD) Trout", "answer": "C"},
]

# question text -> the responses the scripted engine gives, in order of sampling
SCRIPT = {
    "2+3": ["so \\boxed{5}", "\\boxed{5}", "\\boxed{6}", "\\boxed{5}"],  # 3/4, maj 5 (right)
    "4+4": ["\\boxed{16}", "\\boxed{16}", "\\boxed{8}", "no box"],  # 1/4, maj 16 (wrong)
    "9-6": ["no box", "\\boxed{2}", "\\boxed{3}", "\\boxed{2}"],  # 1/4, maj 2 (wrong)
    "7*6": ["\\boxed{42}"] * 4,
    "1/2+1/2": ["\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{1}"],  # tie: "1" came first
    "prime": ["\\boxed{C}", "\\boxed{A}", "The answer is (C)", "\\boxed{C}"],
    "even": ["\\boxed{A}"] * 4,
    "boils": ["\\boxed{B}", "\\boxed{B}", "\\boxed{D}", "\\boxed{B}"],
    "mammal": ["\\boxed{A}", "\\boxed{C}", "\\boxed{A}", "\\boxed{C}"],
}


@dataclass
class ScriptedEngine:
    """A RolloutEngine that answers from SCRIPT (recognising the question in the prompt)."""

    tokenizer: object
    calls: list[tuple[list[str], int]] = field(default_factory=list)
    given: Counter = field(default_factory=Counter)

    def generate(self, prompts, n, sampling):
        texts = [self.tokenizer.decode(p) for p in prompts]
        keys = [next(key for key in SCRIPT if key in text) for text in texts]
        self.calls.append((keys, n))
        out = []
        for index, (ids, key) in enumerate(zip(prompts, keys)):
            for _ in range(n):
                text = SCRIPT[key][self.given[key] % len(SCRIPT[key])]
                self.given[key] += 1
                response = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                out.append(Rollout(index, list(ids), response, text, "stop"))
        return out


def write_benchmarks(root: Path) -> dict[str, Path]:
    """The custom math file, an AMC23 folder, a GPQA-shaped folder and an ARC-c-shaped parquet."""
    root.mkdir(parents=True, exist_ok=True)
    math_file = root / "mymath.jsonl"
    math_file.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    for folder, rows in (("AMC23", AMC_ROWS), ("GPQA", CHOICE_ROWS)):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "test.json").write_text(json.dumps(rows))
    (root / "ARC-c").mkdir(exist_ok=True)
    arc = [
        {
            "data_source": "arc_c",
            "prompt": [
                {"content": ARC_SYSTEM, "role": "system"},
                {"content": r["question"], "role": "user"},
            ],
            "ability": "math",
            "reward_model": {"ground_truth": r["answer"], "style": "rule"},
            "extra_info": {"index": i, "split": "default"},
        }
        for i, r in enumerate(ARC_ROWS)
    ]
    pq.write_table(pa.Table.from_pylist(arc), root / "ARC-c" / "test.parquet")
    return {"math": math_file, "amc": root / "AMC23", "gpqa": root / "GPQA", "arc": root / "ARC-c"}


# ----------------------------------------------------------------------- independent recomputation


def brute_pass(verdicts: list[float], k: int) -> Fraction:
    subsets = list(itertools.combinations(verdicts, k))
    return Fraction(sum(any(v >= 0.5 for v in s) for s in subsets), len(subsets))


def recompute(samples: list[dict], k: int) -> dict[str, dict]:
    """Per benchmark: avg@k, pass@j and maj@k straight from the sample records."""
    out: dict[str, dict] = {}
    for bench in dict.fromkeys(s["benchmark"] for s in samples):
        groups: dict[str, list[dict]] = {}
        for s in samples:
            if s["benchmark"] == bench and s["sample"] < k:
                groups.setdefault(s["question_id"], []).append(s)
        for group in groups.values():
            group.sort(key=lambda s: s["sample"])
            assert [s["sample"] for s in group] == list(range(k))  # each sample exactly once
        verdicts = [[s["verdict"] for s in g] for g in groups.values()]
        maj = []
        for g in groups.values():
            votes = Counter(s["extracted"].strip() for s in g if s["extracted"] is not None)
            if not votes:
                maj.append(0.0)
                continue
            top = max(votes.values())
            winner = next(
                s for s in g if s["extracted"] is not None and votes[s["extracted"].strip()] == top
            )
            maj.append(winner["verdict"])
        ks = sorted({j for j in (1, 2, 4, 8, 16) if j <= k} | {k})
        out[bench] = {
            "avg@k": sum(map(sum, verdicts)) / sum(map(len, verdicts)),
            "pass@k": {
                str(j): float(sum(brute_pass(v, j) for v in verdicts) / len(verdicts)) for j in ks
            },
            "maj@k": sum(maj) / len(maj),
            "questions": len(groups),
        }
    return out


def md_cells(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    return dict(zip(header, row))


def assert_outputs_agree(output: Path, k: int) -> dict:
    results = json.loads((output / "results.json").read_text())
    samples = [
        s for s in read_samples(output / "samples.jsonl") if s["benchmark"] in results["benchmarks"]
    ]
    expected = recompute(samples, k)
    assert set(expected) == set(results["benchmarks"])
    cells = md_cells((output / "results.md").read_text())
    for bench, want in expected.items():
        got = results["benchmarks"][bench]
        assert got["questions"] == want["questions"] and got["k"] == k
        assert got["avg@k"] == pytest.approx(want["avg@k"])
        assert got["maj@k"] == pytest.approx(want["maj@k"])
        assert got["pass@k"] == pytest.approx(want["pass@k"])
        assert cells[got["column"]] == f"{100 * want['avg@k']:.1f}"
    ids = [b for b in expected if results["benchmarks"][b]["kind"] == "id"]
    if ids:
        id_avg = sum(expected[b]["avg@k"] for b in ids) / len(ids)
        assert results["averages"]["id"]["value"] == pytest.approx(id_avg)
        assert cells["avg"] == f"{100 * id_avg:.1f}"
    ood = [b for b in expected if results["benchmarks"][b]["kind"] == "ood"]
    if ood:
        ood_avg = sum(expected[b]["avg@k"] for b in ood) / len(ood)
        assert cells["OOD avg"] == f"{100 * ood_avg:.1f}"
    assert (output / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    return results


# ----------------------------------------------------------------------------------- tests


def test_scripted_run_writes_files_that_agree_and_match_hand_counts(tiny, tmp_path):
    model, tokenizer = tiny
    paths = write_benchmarks(tmp_path / "data")
    engine = ScriptedEngine(tokenizer)
    results = evaluate(
        model,
        [str(paths["math"]), str(tmp_path / "data")],
        tokenizer=tokenizer,
        engine=engine,
        k=4,
        sampling=SamplingParams(temperature=0.6, top_p=0.95, seed=0),
        output_dir=tmp_path / "out",
        fields={"prompt": "question", "answer": "final", "id": "uid"},
        progress=False,
        show=False,
    )
    assert list(results["benchmarks"]) == ["mymath", "amc23", "arc_c", "gpqa"]
    out = assert_outputs_agree(tmp_path / "out", 4)
    mymath, amc, arc, gpqa = (out["benchmarks"][b] for b in ("mymath", "amc23", "arc_c", "gpqa"))
    # hand counts from SCRIPT
    assert mymath["avg@k"] == pytest.approx(5 / 12) and mymath["maj@k"] == pytest.approx(1 / 3)
    assert mymath["no_boxed"] == pytest.approx(2 / 12)
    assert (
        amc["avg@k"] == pytest.approx(6 / 8) and amc["maj@k"] == 1.0
    )  # boxed ground truth; tie -> "1"
    assert gpqa["avg@k"] == pytest.approx(3 / 8) and gpqa["maj@k"] == pytest.approx(1 / 2)
    assert arc["avg@k"] == pytest.approx(5 / 8) and arc["pass@k"]["4"] == 1.0
    assert out["averages"]["id"]["benchmarks"] == ["amc23"]
    assert out["averages"]["ood"]["value"] == pytest.approx((3 / 8 + 5 / 8) / 2)
    samples = read_samples(tmp_path / "out" / "samples.jsonl")
    assert len(samples) == 4 * (3 + 2 + 2 + 2)
    first = samples[0]
    assert first["question_id"] == "q-a" and first["answer"] == "5" and first["extracted"] == "5"
    assert MATH_INSTRUCTION in first["prompt"] and "What is 2+3?" in first["prompt"]
    choice = next(s for s in samples if s["benchmark"] == "gpqa" and s["sample"] == 2)
    assert choice["extracted"] == "C" and choice["verdict"] == 1.0  # "The answer is (C)" counts
    assert CHOICE_INSTRUCTION in choice["prompt"]
    arc_prompt = next(s["prompt"] for s in samples if s["benchmark"] == "arc_c")
    assert ARC_SYSTEM in arc_prompt  # the row's system prompt is kept by default


def test_resume_generates_only_missing_samples(tiny, tmp_path):
    model, tokenizer = tiny
    paths = write_benchmarks(tmp_path / "data")
    run = dict(
        tokenizer=tokenizer,
        k=4,
        output_dir=tmp_path / "out",
        progress=False,
        show=False,
        sampling=SamplingParams(temperature=0.6, top_p=0.95, seed=0),
    )
    first = ScriptedEngine(tokenizer)
    evaluate(model, [str(paths["amc"])], engine=first, **run)
    before = (tmp_path / "out" / "samples.jsonl").read_text()

    second = ScriptedEngine(tokenizer)
    evaluate(model, [str(paths["amc"]), str(paths["gpqa"])], engine=second, **run)
    assert {key for keys, _ in second.calls for key in keys} == {
        "prime",
        "even",
    }  # AMC not regenerated
    after = (tmp_path / "out" / "samples.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 16
    assert_outputs_agree(tmp_path / "out", 4)

    # a run cut mid-benchmark (and mid-line): only the missing (question, sample) pairs come back
    lines = after.splitlines(keepends=True)
    kept = [line for line in lines if not ('"gpqa"' in line and '"sample": 3' in line)]
    (tmp_path / "out" / "samples.jsonl").write_text("".join(kept) + '{"benchmark": "gpq')
    third = ScriptedEngine(tokenizer)
    evaluate(model, [str(paths["amc"]), str(paths["gpqa"])], engine=third, **run)
    assert third.calls == [(["prime", "even"], 1)]
    assert_outputs_agree(tmp_path / "out", 4)

    # a ground truth fixed in the data file: that question's samples are regenerated and replace
    # the stale ones (samples.jsonl keeps one record per sample)
    (paths["amc"] / "test.json").write_text(
        json.dumps([AMC_ROWS[0], {**AMC_ROWS[1], "answer": "1"}])
    )
    fifth = ScriptedEngine(tokenizer)
    evaluate(model, [str(paths["amc"]), str(paths["gpqa"])], engine=fifth, **run)
    assert fifth.calls == [(["1/2+1/2"], 4)]
    assert_outputs_agree(tmp_path / "out", 4)

    # more samples a question: only samples 4..7 are generated
    fourth = ScriptedEngine(tokenizer)
    evaluate(model, [str(paths["amc"])], engine=fourth, **{**run, "k": 8})
    assert fourth.calls == [(["7*6", "1/2+1/2"], 4)]
    assert_outputs_agree(tmp_path / "out", 8)


def test_cli_on_the_tiny_model_with_the_real_engine(tiny_dir, tmp_path, capsys):
    paths = write_benchmarks(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(tiny_dir),
        "--benchmarks",
        str(paths["math"]),
        str(paths["gpqa"]),
        "--field",
        "prompt=question",
        "--field",
        "answer=final",
        "--k",
        "2",
        "--max-new-tokens",
        "8",
        "--output",
        str(out),
        "--no-progress",
        "--name",
        "tiny-run",
        "--limit",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny-run" in printed and "GPQA" in printed
    results = assert_outputs_agree(out, 2)
    assert results["name"] == "tiny-run" and results["settings"]["k"] == 2
    header, rows = results_rows([results])  # the file and the terminal show the same rows
    assert (out / "results.md").read_text() == to_markdown(header, rows)
    assert all(cell in printed for cell in header[1:4] + rows[0][:2])
    samples = read_samples(out / "samples.jsonl")
    assert len(samples) == 2 * 2 * 2 and all(0 < s["response_tokens"] <= 8 for s in samples)

    # report merges it; a re-run with other sampling settings refuses to mix samples
    assert main(["report", str(out), "--output", str(tmp_path / "report.md")]) == 0
    assert "| tiny-run |" in (tmp_path / "report.md").read_text()
    assert main([*argv, "--temperature", "1.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temperature 0.6 -> 1.0" in err[0]


def test_cli_bad_inputs_exit_2_with_one_line(tiny_dir, tmp_path, capsys):
    paths = write_benchmarks(tmp_path / "data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer here"}\n')
    common = ["--output", str(tmp_path / "o"), "--no-progress"]
    cases = {
        "no such model folder": [
            "--model",
            str(tmp_path / "missing"),
            "--benchmarks",
            str(paths["gpqa"]),
        ],
        "unknown benchmark 'aime99'": ["--model", str(tiny_dir), "--benchmarks", "aime99"],
        "bad.jsonl": ["--model", str(tiny_dir), "--benchmarks", str(bad)],
        "--field 'prompt'": [
            "--model",
            str(tiny_dir),
            "--benchmarks",
            str(paths["math"]),
            "--field",
            "prompt",
        ],
        "--k must be >= 1": [
            "--model",
            str(tiny_dir),
            "--benchmarks",
            str(paths["gpqa"]),
            "--k",
            "0",
        ],
        "--template": [
            "--model",
            str(tiny_dir),
            "--benchmarks",
            str(paths["gpqa"]),
            "--template",
            "no placeholder",
        ],
    }
    for needle, args in cases.items():
        assert main(["eval", *args, *common]) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hpt eval: error:") and needle in err[0], err


def test_hub_model_id_without_network_is_a_clear_error(monkeypatch):
    from hpt.errors import ModelError
    from hpt.eval import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model 'nobody-here/no-such-model'"):
        load_model("nobody-here/no-such-model")


def test_evaluate_questions_in_memory(tiny):
    model, tokenizer = tiny
    questions = [
        Question(id=f"q{i}", prompt=f"What is {a}?", answer=str(a)) for i, a in enumerate((2, 3))
    ]
    # scripted: known metrics, pass@k curve and flat keys
    scripted = ScriptedEngine(tokenizer)
    SCRIPT_Q = {
        "What is 2?": ["\\boxed{2}", "\\boxed{1}"],
        "What is 3?": ["\\boxed{0}", "\\boxed{0}"],
    }
    SCRIPT.update(SCRIPT_Q)
    try:
        result = evaluate_questions(
            model,
            tokenizer,
            questions,
            k=2,
            engine=scripted,
            sampling=SamplingParams(temperature=1.0, seed=0),
        )
    finally:
        for key in SCRIPT_Q:
            SCRIPT.pop(key)
    assert result["avg@k"] == pytest.approx(0.25) and result["pass@1"] == pytest.approx(0.25)
    assert result["pass@2"] == pytest.approx(0.5) and result["pass@k"] == {1: 0.25, 2: 0.5}
    assert result["maj@k"] == pytest.approx(0.5) and len(result["samples"]) == 4

    # the real engine, greedy by default for k = 1: deterministic, one sample a question
    a = evaluate_questions(
        model, tokenizer, questions, sampling=SamplingParams(temperature=0.0, max_new_tokens=6)
    )
    b = evaluate_questions(
        model, tokenizer, questions, sampling=SamplingParams(temperature=0.0, max_new_tokens=6)
    )
    assert [s["response"] for s in a["samples"]] == [s["response"] for s in b["samples"]]
    assert len(a["samples"]) == 2 and set(a) >= {"avg@k", "pass@1", "maj@k", "samples"}


def test_prompting_rules(tiny):
    _, tokenizer = tiny
    q = Question(
        id="x",
        prompt=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q?"}],
        answer="A",
    )
    chat = make_builder(tokenizer, choice=True).prompt_text(q)
    assert "SYS" in chat and chat.count(CHOICE_INSTRUCTION) == 1
    assert "SYS" not in make_builder(tokenizer, choice=True, drop_system=True).prompt_text(q)
    llama = make_builder(tokenizer, template="llama").prompt_text(q)
    assert llama.startswith("Question:\nQ?\n" + MATH_INSTRUCTION) and llama.endswith(
        "Let's think step by step."
    )
    assert CHOICE_INSTRUCTION in make_builder(tokenizer, choice=True, template="llama").prompt_text(
        q
    )
    custom = make_builder(tokenizer, template="Q: {question}\nA:").prompt_text(q)
    assert custom == "Q: Q?\n" + MATH_INSTRUCTION + "\nA:"

    # a chat template that adds the boxed instruction itself (as Qwen2.5-Math's does): not twice
    assert not template_adds_instruction(tokenizer)
    original = tokenizer.chat_template
    system = "<|im_start|>system\n" + MATH_INSTRUCTION.replace("\\", "\\\\") + "<|im_end|>\n"
    tokenizer.chat_template = "{{ '" + system + "' }}" + original
    try:
        assert template_adds_instruction(tokenizer)
        text = make_builder(tokenizer).prompt_text(Question(id="y", prompt="Q?", answer="1"))
        assert text.count(MATH_INSTRUCTION) == 1 and text.index(MATH_INSTRUCTION) < text.index("Q?")
    finally:
        tokenizer.chat_template = original


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


@pytest.fixture
def one_thread():
    """One torch thread: on a shared, loaded 2-core machine two threads decode several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmarks absent")
def test_smollm2_on_all_eight_shared_benchmarks(tmp_path, capsys, one_thread):
    """SmolLM2-135M-Instruct (GGUF via --gguf-file) over the paper's eight sets, 2 questions x 2."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    from hpt.demo.tiny import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = tmp_path / "smol"
    argv = [
        "eval",
        "--model",
        str(gguf.parent),
        "--gguf-file",
        gguf.name,
        "--benchmarks",
        str(SHARED),
        "--limit",
        "2",
        "--k",
        "2",
        "--max-new-tokens",
        "48",
        "--output",
        str(out),
        "--no-progress",
        "--dtype",
        "float32",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = assert_outputs_agree(out, 2)
    assert list(results["benchmarks"]) == [
        "aime24",
        "aime25",
        "amc23",
        "math500",
        "minerva",
        "olympiadbench",
        "arc_c",
        "gpqa",
    ]
    assert set(results["averages"]) == {"id", "ood"}
    samples = read_samples(out / "samples.jsonl")
    assert len(samples) == 8 * 2 * 2 and all(s["response"] for s in samples)
    assert "AIME24" in printed and "OOD avg" in printed
    print((out / "results.md").read_text())  # shown with -s


def test_streamed_verdicts_equal_verdicts_after_generation(tiny):
    """An engine that reports rollouts as they finish (out of order, in pieces) is verified while
    it generates; the records are those of verifying after it returns."""
    _, tokenizer = tiny

    class Streaming(ScriptedEngine):
        def generate(self, prompts, n, sampling, on_finished=None):
            out = super().generate(prompts, n, sampling)
            pairs = list(enumerate(out))[::-1]
            if on_finished is not None:
                on_finished(pairs[: len(pairs) // 2])
                self.streamed += len(pairs) // 2
                on_finished(pairs[len(pairs) // 2 : -1])  # the first rollout is never reported
            return out

    questions = [
        Question(id=f"q{i}", prompt=f"What is {a}?", answer=str(a)) for i, a in enumerate((2, 3))
    ]
    script = {"What is 2?": ["\\boxed{2}", "\\boxed{1}", "2"], "What is 3?": ["\\boxed{3}", "no"]}
    SCRIPT.update(script)
    try:
        results = []
        for engine in (ScriptedEngine(tokenizer), Streaming(tokenizer)):
            engine.streamed = 0
            results.append(
                evaluate_questions(
                    None,
                    tokenizer,
                    questions,
                    k=3,
                    engine=engine,
                    sampling=SamplingParams(temperature=1.0, seed=0),
                )
            )
    finally:
        for key in script:
            SCRIPT.pop(key)
    assert engine.streamed > 0
    plain, streamed = results
    assert [s["verdict"] for s in plain["samples"]] == [s["verdict"] for s in streamed["samples"]]
    assert [s["verdict"] for s in plain["samples"]] == [
        1.0,
        0.0,
        0.0,
        1.0,
        0.0,
        1.0,
    ]  # "2" is unboxed
    assert plain["avg@k"] == streamed["avg@k"]
