"""Evaluate a model on benchmarks: sample k responses a question, verify them, compute metrics.

Two entry points share one loop (:func:`sample_and_score`):

- :func:`evaluate_questions`: in memory, no files; the trainer's periodic evaluation.
- :func:`evaluate`: the ``hpt eval`` pipeline over registered or custom benchmarks, writing
  ``samples.jsonl`` (appended batch by batch, so an interrupted run resumes where it stopped),
  ``results.json``, ``results.md`` (the paper's table layout) and ``pass_at_k.png``.

Prompts are built by :mod:`hpt.eval.prompts`, models loaded by :mod:`hpt.eval.models`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError, DataError
from hpt.eval.benchmarks import Benchmark, resolve_benchmarks
from hpt.eval.metrics import kind_averages, summarize
from hpt.eval.models import load_model, model_key, model_label, model_source, torch_dtype
from hpt.eval.prompts import MATH_INSTRUCTION, default_sampling, make_builder, plain_template
from hpt.utils import atomic_write_text, progress_bar

__all__ = ["sample_and_score", "evaluate_questions", "read_samples", "evaluate"]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "pass_at_k.png"
SETTINGS_FILE = "run.json"


# --------------------------------------------------------------------------------------------
# the loop: generate, extract, verify


def _extractor(reward: str) -> Callable[[str], str | None]:
    """How a response's final answer is read for maj@k and the samples file."""
    from hpt.rewards import extract_boxed

    if reward == "choice":
        from hpt.rewards.extract import extract_choice

        return extract_choice
    return extract_boxed


def _generate_and_score(
    engine: Any,
    prompts: list[list[int]],
    n: int,
    sampling: Any,
    answers: list[str],
    reward: str,
    timeout: float,
) -> tuple[list[Any], list[float], int]:
    """One batch's rollouts, their verdicts and its count of verifier timeouts.

    Rollouts the engine reports as they finish are verified while it generates the rest
    (:class:`hpt.rewards.StreamingScorer`); the others after it returns.
    """
    from hpt.rewards import StreamingScorer

    scorer = StreamingScorer(answers, reward, timeout=timeout)
    rollouts = scorer.generate(engine, prompts, n, sampling)
    if len(rollouts) != len(answers):
        scorer.close()
        raise RuntimeError(
            f"engine returned {len(rollouts)} rollouts for {len(prompts)} prompts x {n}"
        )
    result = scorer.result([r.text for r in rollouts])
    return rollouts, [float(s) for s in result.scores], int(result.timeouts)


def _question_keys(questions: Sequence[Any]) -> list[str]:
    """Unique ids of the questions (their own ids, made unique by position where repeated)."""
    ids = [str(q.id) for q in questions]
    if len(set(ids)) == len(ids):
        return ids
    return [f"{qid}#{position}" for position, qid in enumerate(ids)]


def sample_and_score(
    questions: Sequence[Any],
    *,
    builder: Any,
    engine: Any,
    sampling: Any,
    k: int,
    reward: str = "math",
    benchmark: str = "",
    existing: Iterable[Mapping[str, Any]] = (),
    batch_questions: int | None = None,
    timeout: float = 5.0,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate the missing samples of ``questions`` (k each), verify them, return all records.

    Samples already in ``existing`` (same benchmark, question id, prompt text and ground truth,
    sample index < k) are kept and not generated again; the missing ones are generated in batches of questions grouped by
    how many samples they still need, ``engine.generate(prompt_ids, n=missing, sampling)``.

    Args:
        questions: ``hpt.data.Question`` objects.
        builder: ``PromptBuilder`` (``prompt_text`` / ``prompt_ids``).
        engine: a ``RolloutEngine``.
        sampling: ``SamplingParams``; batch ``b`` uses seed ``sampling.seed + b`` when seeded.
        k: samples a question.
        reward: reward name for ``hpt.rewards.score``.
        benchmark: the name written in each record.
        existing: records loaded from an earlier run (resume).
        batch_questions: questions per ``generate`` call (default: about 64 sequences a call).
        timeout: per-sample verifier timeout in seconds.
        on_batch: called with each batch's new records as soon as they are scored (append to
            ``samples.jsonl`` there).
        progress: show a rich progress bar over questions.

    Returns:
        One record per (question, sample), question-major then sample order: ``benchmark``,
        ``question_id``, ``sample``, ``prompt``, ``response``, ``extracted``, ``answer``,
        ``verdict``, ``boxed``, ``response_tokens``, ``finish_reason``, ``timeouts`` (the
        verifier counts timeouts per batch: a batch's count sits on its first record, 0 on the
        others; a timed-out sample scores 0).
    """
    if k < 1:
        raise ConfigError(f"k (samples a question) must be >= 1, got {k}")
    keys = _question_keys(questions)
    texts = {key: builder.prompt_text(q) for key, q in zip(keys, questions)}
    truths = {key: str(q.answer) for key, q in zip(keys, questions)}
    have: dict[tuple[str, int], dict[str, Any]] = {}
    for record in existing:  # reuse a sample only for the same benchmark, prompt and answer
        key = str(record["question_id"])
        if (
            record.get("benchmark") == benchmark
            and int(record["sample"]) < k
            and record.get("prompt") == texts.get(key)
            and record.get("answer") == truths.get(key)
        ):
            have[(key, int(record["sample"]))] = dict(record)
    missing = {i: [j for j in range(k) if (key, j) not in have] for i, key in enumerate(keys)}
    batches = _plan_batches(missing, batch_questions or max(1, 64 // k))
    extract = _extractor(reward)
    from hpt.rewards import extract_boxed

    done = sum(1 for todo in missing.values() if not todo)
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(benchmark or "eval", total=len(questions), completed=done)
        for batch_index, (indices, n) in enumerate(batches):
            prompts = _prompt_ids(builder, [questions[i] for i in indices])
            seeded = (
                sampling
                if sampling.seed is None
                else replace(sampling, seed=sampling.seed + batch_index)
            )
            slots = [(i, j) for i in indices for j in missing[i][:n]]
            answers = [str(questions[i].answer) for i, _ in slots]
            rollouts, verdicts, timeouts = _generate_and_score(
                engine, prompts, n, seeded, answers, reward, timeout
            )
            new = []
            for (i, j), rollout, answer, verdict in zip(slots, rollouts, answers, verdicts):
                record = {
                    "benchmark": benchmark,
                    "question_id": keys[i],
                    "sample": j,
                    "prompt": texts[keys[i]],
                    "response": rollout.text,
                    "extracted": extract(rollout.text),
                    "answer": answer,
                    "verdict": verdict,
                    "boxed": extract_boxed(rollout.text) is not None,
                    "response_tokens": len(rollout.response_ids),
                    "finish_reason": rollout.finish_reason,
                    "timeouts": 0 if new else timeouts,  # the batch's count, on its first record
                }
                have[(keys[i], j)] = record
                new.append(record)
            for i in indices:
                missing[i] = missing[i][n:]
            if on_batch is not None:
                on_batch(new)
            bar.update(task, advance=len(indices))
    return [have[(key, j)] for key in keys for j in range(k)]


def _prompt_ids(builder: Any, questions: list[Any]) -> list[list[int]]:
    batch = getattr(builder, "prompt_ids_batch", None)
    return batch(questions) if batch is not None else [builder.prompt_ids(q) for q in questions]


def _plan_batches(missing: Mapping[int, list[int]], per_batch: int) -> list[tuple[list[int], int]]:
    """Batches ``(question indices, n)``: questions needing the same number n of samples, in order."""
    by_count: dict[int, list[int]] = {}
    for index, todo in missing.items():
        if todo:
            by_count.setdefault(len(todo), []).append(index)
    return [
        (indices[start : start + per_batch], n)
        for n, indices in sorted(by_count.items(), key=lambda item: -item[0])
        for start in range(0, len(indices), per_batch)
    ]


def _metrics(records: Sequence[Mapping[str, Any]], k: int) -> dict[str, Any]:
    """avg@k, pass@k (dict and flat ``pass@K`` keys) and maj@k of records (``summarize``'s)."""
    summary = summarize(records, k)
    curve = {int(j): value for j, value in summary["pass@k"].items()}
    return {
        "k": k,
        "avg@k": summary["avg@k"],
        "maj@k": summary["maj@k"],
        "pass@k": curve,
        **{f"pass@{j}": value for j, value in curve.items()},
    }


def evaluate_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Any],
    *,
    reward: str = "math",
    k: int = 1,
    sampling: Any = None,
    builder: Any = None,
    engine: Any = None,
    progress: bool = False,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``questions`` with ``k`` samples each; writes no files.

    The trainer's periodic evaluation (the paper validates with 8 samples at temperature 0.6,
    top-p 0.95; the default here is greedy for k = 1 and that setting for k > 1).

    Args:
        model: a causal LM (used only to build the default engine).
        tokenizer: its tokenizer.
        questions: ``hpt.data.Question`` objects.
        reward: ``math``, ``choice`` or ``module:function``.
        k: samples a question.
        sampling: ``SamplingParams`` (default: :func:`default_sampling`).
        builder: ``PromptBuilder`` (default: :func:`make_builder` for the reward).
        engine: ``RolloutEngine`` (default: ``HFEngine(model, tokenizer)``).
        progress: show a progress bar.
        timeout: per-sample verifier timeout in seconds.

    Returns:
        ``{"k", "avg@k", "maj@k", "pass@k": {K: value}, "pass@1", "pass@2", ..., "samples":
        [records]}`` with fractions in [0, 1] (see :func:`sample_and_score` for the records).
    """
    if not questions:
        raise DataError("evaluate_questions: no questions")
    if builder is None:
        builder = make_builder(tokenizer, choice=reward == "choice")
    if sampling is None:
        sampling = default_sampling(k)
    if engine is None:
        from hpt.rollout import HFEngine

        engine = HFEngine(model, tokenizer)
    records = sample_and_score(
        questions,
        builder=builder,
        engine=engine,
        sampling=sampling,
        k=k,
        reward=reward,
        timeout=timeout,
        progress=progress,
    )
    return {**_metrics(records, k), "samples": records}


# --------------------------------------------------------------------------------------------
# the hpt eval pipeline


@dataclass
class _Settings:
    """What must match for samples of an earlier run to be reused."""

    model: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int | None
    template: str | None
    system_prompt: str | None
    drop_system: bool


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``samples.jsonl``; a torn last line (an interrupted write) is skipped.

    Raises:
        DataError: a malformed line elsewhere (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            _ = record["benchmark"], record["question_id"], int(record["sample"]), record["verdict"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            if number == len(lines):
                break
            raise DataError(f"{path}: line {number}: not a sample record ({error})") from error
        records.append(record)
    return records


def _append(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()


def _check_resume(output: Path, settings: _Settings, overwrite: bool) -> list[dict[str, Any]]:
    """Records to reuse from ``output`` (none when new or ``overwrite``); writes ``run.json``."""
    samples, saved = output / SAMPLES_FILE, output / SETTINGS_FILE
    if overwrite:
        samples.unlink(missing_ok=True)
    elif samples.is_file() and saved.is_file():
        before = json.loads(saved.read_text())
        diff = [
            f"{key} {before.get(key)!r} -> {value!r}"
            for key, value in asdict(settings).items()
            if before.get(key) != value
        ]
        if diff:
            raise ConfigError(
                f"{output}: holds samples of another setup ({'; '.join(diff)}); use another --output or --overwrite"
            )
    output.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return _compact(samples)


def _compact(samples: Path) -> list[dict[str, Any]]:
    """Rewrite ``samples.jsonl`` with one record per (benchmark, question, sample), the newest.

    Drops a torn last line (so appends start on a new line) and records superseded by a
    regenerated sample (after a prompt or ground truth changed). Returns the kept records.
    """
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for record in read_samples(samples):
        latest[(record["benchmark"], str(record["question_id"]), int(record["sample"]))] = record
    records = list(latest.values())
    if samples.is_file():
        partial = samples.with_suffix(".jsonl.tmp")
        partial.unlink(missing_ok=True)
        _append(partial, records)
        partial.replace(samples)
    return records


def _load_benchmark(benchmark: Benchmark, limit: int | None) -> list[Any]:
    from hpt.data import load_questions

    split = benchmark.hf_split if benchmark.source == benchmark.hf_id else None
    return load_questions(
        benchmark.source, fields=dict(benchmark.fields or {}) or None, split=split, limit=limit
    )


def evaluate(
    model_or_path: Any,
    benchmarks: Sequence[str],
    *,
    k: int = 1,
    sampling: Any = None,
    output_dir: str | Path | None = None,
    limit: int | None = None,
    tokenizer: Any = None,
    engine: Any = None,
    benchmark_dir: str | Path | None = None,
    reward: str | None = None,
    fields: Mapping[str, str] | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    drop_system: bool = False,
    dtype: str = "auto",
    gguf_file: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    name: str | None = None,
    timeout: float = 5.0,
    overwrite: bool = False,
    progress: bool = True,
    show: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on benchmarks; the library function behind ``hpt eval``.

    Args:
        model_or_path: a loaded model (give ``tokenizer`` too) or a folder / ``.gguf`` / hub id.
        benchmarks: names, files or folders (see :func:`hpt.eval.benchmarks.resolve_benchmarks`).
        k: samples a question.
        sampling: ``SamplingParams`` (default: :func:`default_sampling`).
        output_dir: where to write samples.jsonl, results.json, results.md, pass_at_k.png and
            run.json; ``None`` writes nothing (and cannot resume).
        limit: the first ``limit`` questions of each benchmark.
        tokenizer: the tokenizer of a loaded model.
        engine: a ``RolloutEngine`` (default ``HFEngine(model, tokenizer, batch_size)``).
        benchmark_dir: where named benchmarks live (default ``$HPT_BENCHMARK_DIR``, then
            ``hpt.data``'s default ``../shared/benchmarks``).
        reward, fields: reward and field mapping of custom files.
        template, system_prompt, drop_system: prompting (see :func:`make_builder`).
        dtype, gguf_file, device: model loading (see :func:`load_model`).
        batch_size: sequences a generate call of the default engine.
        name: the run's row name in tables (default: the model folder's name).
        timeout: per-sample verifier timeout in seconds.
        overwrite: discard samples of an earlier run in ``output_dir``.
        progress: show progress bars.
        show: print the result tables.

    Returns:
        The results dict written to results.json: ``name``, ``model``, ``settings``,
        ``benchmarks`` (name -> summary, see :func:`hpt.eval.metrics.summarize`, plus
        ``column``, ``kind``, ``reward``, ``source``), ``averages`` (``id`` / ``ood``).
    """
    start = time.time()
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if template is not None:
        plain_template(template, MATH_INSTRUCTION)  # a bad template fails before loading
    torch_dtype(dtype)
    if isinstance(model_or_path, (str, Path)):
        model_source(model_or_path, gguf_file)  # a missing model fails before any file is written
    root = benchmark_dir if benchmark_dir is not None else _default_benchmark_dir()
    resolved = resolve_benchmarks(benchmarks, benchmark_dir=root, reward=reward, fields=fields)
    data = {b.name: _load_benchmark(b, limit) for b in resolved}
    label = name or model_label(model_or_path, gguf_file)
    from_path = isinstance(model_or_path, (str, Path))
    if not from_path and tokenizer is None:
        raise ConfigError("evaluate: a loaded model needs its tokenizer (tokenizer=...)")
    sampling = sampling or default_sampling(k)
    settings = _Settings(
        model_key(model_or_path) if from_path else label,
        sampling.temperature,
        sampling.top_p,
        sampling.top_k,
        sampling.max_new_tokens,
        sampling.seed,
        template,
        system_prompt,
        drop_system,
    )
    output = Path(output_dir) if output_dir is not None else None
    existing = _check_resume(output, settings, overwrite) if output is not None else []
    if from_path:
        model, tokenizer = load_model(
            model_or_path, dtype=dtype, gguf_file=gguf_file, device=device, progress=progress
        )
    else:
        model = model_or_path
    if engine is None:
        from hpt.rollout import HFEngine

        engine = HFEngine(model, tokenizer, batch_size=batch_size)

    per_benchmark: dict[str, dict[str, Any]] = {}
    builders: dict[bool, Any] = {}
    for benchmark in resolved:
        if benchmark.is_choice not in builders:
            builders[benchmark.is_choice] = make_builder(
                tokenizer,
                choice=benchmark.is_choice,
                template=template,
                system_prompt=system_prompt,
                drop_system=drop_system,
            )
        records = sample_and_score(
            data[benchmark.name],
            builder=builders[benchmark.is_choice],
            engine=engine,
            sampling=sampling,
            k=k,
            reward=benchmark.reward,
            benchmark=benchmark.name,
            existing=existing,
            batch_questions=max(1, batch_size // k),
            timeout=timeout,
            on_batch=(lambda new: _append(output / SAMPLES_FILE, new))
            if output is not None
            else None,
            progress=progress,
        )
        per_benchmark[benchmark.name] = {
            "column": benchmark.column,
            "kind": benchmark.kind,
            "reward": benchmark.reward,
            "source": benchmark.source,
            **summarize(records, k),
        }
    results = {
        "name": label,
        "model": settings.model,
        "settings": {**asdict(settings), "k": k, "limit": limit},
        "benchmarks": per_benchmark,
        "averages": kind_averages(per_benchmark, "avg@k"),
        "seconds": round(time.time() - start, 1),
    }
    if output is not None:
        _compact(output / SAMPLES_FILE)
        _write_outputs(output, results)
    if show:
        _print(results)
    return results


def _default_benchmark_dir() -> Path | None:
    from hpt.data.loaders import benchmark_dir

    return benchmark_dir()


def _write_outputs(output: Path, results: Mapping[str, Any]) -> None:
    from hpt.eval.plots import plot_pass_at_k
    from hpt.eval.report import markdown_table

    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(output / RESULTS_FILE, text)
    atomic_write_text(output / MARKDOWN_FILE, markdown_table([results]))
    plot_pass_at_k(results["benchmarks"], output / PLOT_FILE, title=f"pass@k: {results['name']}")


def _print(results: Mapping[str, Any]) -> None:
    from hpt.eval.report import benchmark_rows, print_rows, print_table

    print_rows(*benchmark_rows(results), title=f"{results['name']}: per benchmark")
    print_table([results], "avg@k")
