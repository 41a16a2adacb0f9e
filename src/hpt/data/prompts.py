"""Prompts and demonstrations as token ids: chat templates, plain templates, over-long demonstrations.

The paper (arXiv 2509.04419, section 3; PAPER.md) prompts Qwen2.5-Math through its chat template
with the user turn only, and the base LLaMA-3.1-8B through a plain "Question: ... Answer:" text
(:data:`PLAIN_TEMPLATES` ``["llama"]``). A demonstration is trained as the assistant turn the
chat template would render after the prompt, so ``prompt_ids(q) + demonstration_ids(q)`` is the
tokenised conversation, cut after its end-of-sequence token.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from hpt.data.question import Message, Question, question_text
from hpt.errors import ConfigError, DataError, ModelError

logger = logging.getLogger("hpt.data")

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# name -> plain prompt with a {question} placeholder (filled by str.replace: braces stay literal)
PLAIN_TEMPLATES: dict[str, str] = {
    # the paper's format for the base LLaMA-3.1-8B
    "llama": (
        "Question:\n{question}\n" + BOXED_INSTRUCTION + "\nAnswer:\nLet's think step by step."
    ),
}


def _resolve_template(template: str | None) -> str | None:
    if template is None:
        return None
    if template in PLAIN_TEMPLATES:
        return PLAIN_TEMPLATES[template]
    if "{question}" not in template:
        names = ", ".join(PLAIN_TEMPLATES)
        raise ConfigError(
            f"template must contain {{question}} or be one of: {names}; got {template[:60]!r}"
        )
    return template


class PromptBuilder:
    """Turns questions into prompt text, prompt ids and demonstration ids for one tokenizer.

    Two paths:

    - chat template (default): the question's messages (a text prompt becomes one user
      message), ``instruction`` appended to the last user turn, ``system_prompt`` replacing or
      adding the system message, then ``tokenizer.apply_chat_template(...,
      add_generation_prompt=True)``;
    - plain ``template``: ``template`` with ``{question}`` replaced by the question's user text
      (plus ``instruction``); system messages are left out and ``system_prompt``, if given, is
      put first, followed by a blank line.

    Args:
        tokenizer: A Hugging Face tokenizer with an ``eos_token``.
        system_prompt: A system message to use instead of the dataset's (chat path).
        instruction: Text appended to the user turn, e.g. :data:`BOXED_INSTRUCTION`; not added
            twice when the question already contains it.
        template: A plain prompt with ``{question}``, or a name of :data:`PLAIN_TEMPLATES`.
        drop_system: Drop the dataset's system messages (the paper keeps the user turn only).
        instruction_separator: Put between the question and ``instruction``.

    Raises:
        ModelError: No chat template and no ``template``; or no EOS token.
        ConfigError: A ``template`` without ``{question}``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        system_prompt: str | None = None,
        instruction: str | None = None,
        template: str | None = None,
        drop_system: bool = False,
        instruction_separator: str = "\n",
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.template = _resolve_template(template)
        self.drop_system = drop_system
        self.instruction_separator = instruction_separator
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                f"tokenizer {name!r} has no chat template; set template= (a plain prompt with "
                "{question}, e.g. PLAIN_TEMPLATES['llama']) or use a tokenizer that has one"
            )
        if tokenizer.eos_token_id is None:
            raise ModelError(f"tokenizer {name!r} has no eos_token; set tokenizer.eos_token")
        self.eos_token_id: int = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        probe = tokenizer("", add_special_tokens=True)["input_ids"]
        # the BOS id that a plain prompt needs (the tokenizer would add it), else None
        self._plain_bos: int | None = bos if bos is not None and probe[:1] == [bos] else None
        self._warned_fallback = False

    @property
    def uses_chat_template(self) -> bool:
        """True on the chat-template path, False with a plain ``template``."""
        return self.template is None

    # ---------------------------------------------------------------------------------- text

    def messages(self, question: Question) -> list[Message]:
        """The chat messages of the prompt, after the system and instruction options."""
        if isinstance(question.prompt, str):
            messages = [{"role": "user", "content": question.prompt}]
        else:
            messages = [dict(m) for m in question.prompt]
        if self.drop_system or self.system_prompt is not None:
            messages = [m for m in messages if m["role"] != "system"]
        if self.instruction:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if users:
                last = messages[users[-1]]
                last["content"] = self._with_instruction(last["content"])
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _with_instruction(self, text: str) -> str:
        if not self.instruction or self.instruction in text:
            return text
        return f"{text}{self.instruction_separator}{self.instruction}"

    def prompt_text(self, question: Question) -> str:
        """The prompt as the model sees it, ending where the response begins."""
        if self.template is None:
            return self._render(self.messages(question), add_generation_prompt=True)
        text = self.template.replace(
            "{question}", self._with_instruction(question_text(question.prompt))
        )
        return text if self.system_prompt is None else f"{self.system_prompt}\n\n{text}"

    def _render(self, messages: list[Message], *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    # ----------------------------------------------------------------------------------- ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def prompt_ids(self, question: Question) -> list[int]:
        """Token ids of :meth:`prompt_text`, with exactly one BOS where the model uses one.

        Chat templates write their own special tokens (a BOS included), so the text is encoded
        with ``add_special_tokens=False``; a plain prompt gets the tokenizer's BOS once.
        """
        return self.prompt_ids_batch([question])[0]

    def prompt_ids_batch(self, questions: Sequence[Question]) -> list[list[int]]:
        """:meth:`prompt_ids` of many questions, tokenised in one call."""
        encoded = self._encode([self.prompt_text(q) for q in questions])
        if self.template is None or self._plain_bos is None:
            return encoded
        return [ids if ids[:1] == [self._plain_bos] else [self._plain_bos, *ids] for ids in encoded]

    def demonstration_ids(self, question: Question, max_tokens: int | None = None) -> list[int]:
        """The demonstration as the assistant turn after :meth:`prompt_ids`, ending with EOS.

        Chat path: the tokens of the whole conversation (prompt + assistant turn) after the
        prompt's tokens, cut after the last EOS (a ChatML turn ends ``<|im_end|>\\n``: the
        ``\\n`` is dropped); when the turn holds no EOS, trailing whitespace tokens are dropped
        and EOS is appended. Plain path: the demonstration's tokens + EOS.

        Args:
            question: A question with a demonstration.
            max_tokens: Keep at most this many tokens (a truncated demonstration has no EOS).
                None: the limit a ``"truncate"`` :func:`filter_demonstrations` left in
                ``question.meta["max_response_tokens"]``, if any.

        Returns:
            Token ids [L], L <= max_tokens.
        """
        return self.demonstration_ids_batch([question], max_tokens)[0]

    def demonstration_ids_batch(
        self, questions: Sequence[Question], max_tokens: int | None = None
    ) -> list[list[int]]:
        """:meth:`demonstration_ids` of many questions, tokenised in one call."""
        for q in questions:
            if q.demonstration is None:
                raise DataError(f"question {q.id!r} has no demonstration")
        if self.template is None:
            turns = self._chat_turns(questions)
        else:
            turns = [
                [*ids, self.eos_token_id]
                for ids in self._encode([q.demonstration for q in questions])
            ]
        return [ids[: _limit(q, max_tokens)] for q, ids in zip(questions, turns)]

    def _chat_turns(self, questions: Sequence[Question]) -> list[list[int]]:
        """Assistant-turn ids: the full conversation's tokens after the prompt's."""
        prompts, fulls = [], []
        for q in questions:
            messages = self.messages(q)
            prompts.append(self._render(messages, add_generation_prompt=True))
            reply = {"role": "assistant", "content": q.demonstration}
            fulls.append(self._render([*messages, reply], add_generation_prompt=False))
        prompt_ids = self._encode(prompts)
        full_ids = self._encode(fulls)
        turns = []
        for q, prompt, full, p_ids, f_ids in zip(questions, prompts, fulls, prompt_ids, full_ids):
            if not full.startswith(prompt) or q.demonstration.strip() not in full[len(prompt) :]:
                # the template rewrites the reply (e.g. strips reasoning): train on it verbatim
                self._warn_fallback()
                turns.append([*self._encode([q.demonstration])[0], self.eos_token_id])
                continue
            if f_ids[: len(p_ids)] == p_ids:
                tail = f_ids[len(p_ids) :]
            else:  # a token merged across the boundary: encode the turn on its own
                tail = self._encode([full[len(prompt) :]])[0]
            turns.append(self._end_with_eos(tail))
        return turns

    def _end_with_eos(self, ids: list[int]) -> list[int]:
        if self.eos_token_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.eos_token_id)
            return ids[: last + 1]
        while ids and not self.tokenizer.decode(ids[-1:]).strip():
            ids = ids[:-1]
        return [*ids, self.eos_token_id]

    def _warn_fallback(self) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(
                "the chat template does not render the demonstration verbatim after the prompt; "
                "demonstrations are tokenised as their own text + EOS",
                stacklevel=3,
            )


def _limit(question: Question, max_tokens: int | None) -> int | None:
    if max_tokens is not None:
        return max_tokens
    if question.meta.get("truncated"):
        return question.meta.get("max_response_tokens")
    return None


# ------------------------------------------------------------------------------------------
# over-long demonstrations


Overlong = list[tuple[int, int]]  # (position in the question list, demonstration tokens)


def _drop(questions: list[Question], overlong: Overlong, limit: int) -> list[Question]:
    """Remove the demonstration; the question stays for RL with its prompt and answer."""
    for i, n in overlong:
        meta = {**questions[i].meta, "demonstration_dropped": True, "demonstration_tokens": n}
        questions[i] = replace(questions[i], demonstration=None, meta=meta)
    return questions


def _truncate(questions: list[Question], overlong: Overlong, limit: int) -> list[Question]:
    """Keep the demonstration, marked; :meth:`PromptBuilder.demonstration_ids` cuts it."""
    for i, n in overlong:
        meta = {
            **questions[i].meta,
            "truncated": True,
            "demonstration_tokens": n,
            "max_response_tokens": limit,
        }
        questions[i] = replace(questions[i], meta=meta)
    return questions


def _error(questions: list[Question], overlong: Overlong, limit: int) -> list[Question]:
    if overlong:
        first, n = overlong[0]
        with_demo = sum(q.demonstration is not None for q in questions)
        raise DataError(
            f"{len(overlong)} of {with_demo} demonstrations are longer than "
            f"max_response_tokens={limit} (first: question {questions[first].id!r}, {n} tokens); "
            "raise the limit or use policy 'drop' or 'truncate'"
        )
    return questions


OVERLONG_POLICIES: dict[str, Callable[[list[Question], Overlong, int], list[Question]]] = {
    "drop": _drop,
    "truncate": _truncate,
    "error": _error,
}


def filter_demonstrations(
    questions: Sequence[Question],
    builder: PromptBuilder,
    max_response_tokens: int,
    policy: str = "drop",
    *,
    progress: bool = False,
    chunk_size: int = 256,
) -> tuple[list[Question], dict[str, Any]]:
    """Find demonstrations longer than ``max_response_tokens`` (EOS counted) and apply a policy.

    Policies: ``"drop"`` removes the demonstration (marked ``meta["demonstration_dropped"]``;
    the question keeps its prompt and answer for RL), ``"truncate"`` keeps it marked
    ``meta["truncated"] = True`` so that :meth:`PromptBuilder.demonstration_ids` cuts it,
    ``"error"`` raises. The input questions are not modified.

    Returns:
        (questions, report) with report keys ``policy``, ``max_response_tokens``, ``questions``,
        ``demonstrations``, ``over_limit``, ``dropped``, ``truncated``, ``longest``.

    Raises:
        ConfigError: An unknown policy or a limit < 1.
        DataError: Policy ``"error"`` and at least one over-long demonstration.
    """
    if policy not in OVERLONG_POLICIES:
        raise ConfigError(
            f"unknown demonstration policy {policy!r}; choose from {', '.join(OVERLONG_POLICIES)}"
        )
    if (
        isinstance(max_response_tokens, bool)
        or not isinstance(max_response_tokens, int)
        or max_response_tokens < 1
    ):
        raise ConfigError(
            f"max_response_tokens must be a positive integer, got {max_response_tokens!r}"
        )
    questions = list(questions)
    with_demo = [i for i, q in enumerate(questions) if q.demonstration is not None]
    lengths = _demonstration_lengths(
        builder, [questions[i] for i in with_demo], progress, chunk_size
    )
    overlong = [(i, n) for i, n in zip(with_demo, lengths) if n > max_response_tokens]
    questions = OVERLONG_POLICIES[policy](questions, overlong, max_response_tokens)
    report = {
        "policy": policy,
        "max_response_tokens": max_response_tokens,
        "questions": len(questions),
        "demonstrations": len(with_demo),
        "over_limit": len(overlong),
        "dropped": len(overlong) if policy == "drop" else 0,
        "truncated": len(overlong) if policy == "truncate" else 0,
        "longest": max(lengths, default=0),
    }
    if overlong:
        logger.warning(
            "%d of %d demonstrations are longer than %d tokens (policy %r, first: question %r)",
            len(overlong),
            len(with_demo),
            max_response_tokens,
            policy,
            questions[overlong[0][0]].id,
        )
    return questions, report


def _demonstration_lengths(
    builder: PromptBuilder, questions: list[Question], progress: bool, chunk_size: int
) -> list[int]:
    """Untruncated demonstration lengths in tokens (EOS included), tokenised in chunks."""
    from hpt.utils import progress_bar

    untruncated = [replace(q, meta={}) for q in questions]
    chunks = [untruncated[i : i + chunk_size] for i in range(0, len(untruncated), chunk_size)]
    lengths: list[int] = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("measuring demonstrations", total=len(untruncated))
        for chunk in chunks:
            lengths += [len(ids) for ids in builder.demonstration_ids_batch(chunk)]
            bar.update(task, advance=len(chunk))
    return lengths
