"""Prompts for evaluation: the paper's instruction, chat or plain templates, choice questions.

The paper (arXiv 2509.04419, section 3) prompts Qwen2.5-Math through its chat template with the
user turn only (that template adds "Please reason step by step, and put your final answer within
\\boxed{}." itself), and the base LLaMA-3.1-8B with a plain "Question: ... Answer: Let's think step
by step." text. Models whose template adds no such instruction get it appended to the user turn;
multiple-choice questions ask for the letter of the choice.
"""

from __future__ import annotations

from typing import Any

from hpt.errors import ConfigError, ModelError

__all__ = [
    "MATH_INSTRUCTION",
    "CHOICE_INSTRUCTION",
    "PLAIN_TEMPLATES",
    "template_adds_instruction",
    "plain_template",
    "make_builder",
    "default_sampling",
]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your choice within \\boxed{}."
)

# name -> plain (non-chat) template; {question} is the question, {instruction} the instruction.
PLAIN_TEMPLATES: dict[str, str] = {
    # the paper's LLaMA-3.1-8B (base model) format
    "llama": "Question:\n{question}\n{instruction}\nAnswer:\nLet's think step by step.",
}


def template_adds_instruction(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template already asks for a ``\\boxed{}`` answer.

    Qwen2.5-Math's template adds the system prompt "Please reason step by step, and put your
    final answer within \\boxed{}." by itself; we detect this by rendering an empty user turn.
    A tokenizer without a chat template adds nothing.
    """
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that cannot render an empty turn adds nothing we can see
        return False
    return "\\boxed" in str(text)


def plain_template(template: str, instruction: str) -> tuple[str, str | None]:
    """(template text, instruction still to append) of a plain ``--template``.

    ``{instruction}`` in the template is replaced by the instruction; a template that already
    asks for a box gets none; any other has the instruction appended to the question.
    """
    text = PLAIN_TEMPLATES.get(template, template)
    if "{question}" not in text:
        known = ", ".join(PLAIN_TEMPLATES)
        raise ConfigError(
            f"--template {template[:60]!r}: not a known template ({known}) nor a string with {{question}}"
        )
    if "{instruction}" in text:
        return text.replace("{instruction}", instruction), None
    return text, None if "\\boxed" in text else instruction


def make_builder(
    tokenizer: Any,
    *,
    choice: bool = False,
    template: str | None = None,
    system_prompt: str | None = None,
    drop_system: bool = False,
) -> Any:
    """The ``hpt.data.PromptBuilder`` for one kind of benchmark.

    Args:
        tokenizer: the model's tokenizer.
        choice: multiple-choice answers: ask for the letter of the choice in a box
            (:data:`CHOICE_INSTRUCTION`, always appended); else :data:`MATH_INSTRUCTION`,
            appended unless the chat template already adds it.
        template: ``None`` (the chat template), a name of :data:`PLAIN_TEMPLATES` (``llama``), or
            a string with ``{question}`` (and optionally ``{instruction}``).
        system_prompt: a system turn replacing the rows' own (ARC-c's rows carry one).
        drop_system: drop the rows' system turns.

    Returns:
        A ``PromptBuilder`` with ``prompt_text(q)`` / ``prompt_ids(q)``.

    Raises:
        ModelError: a tokenizer without a chat template and no ``template``.
    """
    from hpt.data import PromptBuilder

    instruction: str | None = CHOICE_INSTRUCTION if choice else MATH_INSTRUCTION
    if template is not None:
        text, instruction = plain_template(template, instruction)
        return PromptBuilder(
            tokenizer,
            template=text,
            instruction=instruction,
            system_prompt=system_prompt,
            drop_system=drop_system,
        )
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelError(
            f"tokenizer {name!r} has no chat template; pass --template llama (or a string with {{question}})"
        )
    if not choice and template_adds_instruction(tokenizer):
        instruction = None
    return PromptBuilder(
        tokenizer, system_prompt=system_prompt, instruction=instruction, drop_system=drop_system
    )


def default_sampling(k: int = 1, max_new_tokens: int = 1024, seed: int | None = 0) -> Any:
    """The paper's evaluation sampling (temperature 0.6, top-p 0.95); greedy when ``k == 1``."""
    from hpt.rollout import SamplingParams

    if k == 1:
        return SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    return SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=max_new_tokens, seed=seed)
