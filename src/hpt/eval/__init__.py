"""Evaluation: benchmarks, avg@k, unbiased pass@k and maj@k, result tables (``hpt eval``, ``hpt report``).

Light at import: these modules import only the standard library and ``hpt`` at module level;
transformers, rich and matplotlib load inside the functions that use them.
Note: ``hpt.eval.evaluate`` is the function below (its module is ``hpt.eval.evaluate`` in
``sys.modules``).
"""

from __future__ import annotations

from hpt.eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark, resolve_benchmarks
from hpt.eval.evaluate import evaluate, evaluate_questions, read_samples, sample_and_score
from hpt.eval.metrics import avg_at_k, maj_at_k, pass_at_k, summarize
from hpt.eval.models import load_model
from hpt.eval.prompts import default_sampling, make_builder
from hpt.eval.report import load_results, markdown_table

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "avg_at_k",
    "default_sampling",
    "evaluate",
    "evaluate_questions",
    "get_benchmark",
    "load_model",
    "load_results",
    "maj_at_k",
    "make_builder",
    "markdown_table",
    "pass_at_k",
    "read_samples",
    "resolve_benchmarks",
    "sample_and_score",
    "summarize",
]
