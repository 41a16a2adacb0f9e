"""hpt.data: loaders (formats, schemas, errors, the shared benchmarks), prompts, demonstration filters."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpt.data import (
    BOXED_INSTRUCTION,
    PLAIN_TEMPLATES,
    PromptBuilder,
    Question,
    benchmark_dir,
    filter_demonstrations,
    load_questions,
    question_text,
)
from hpt.errors import ConfigError, DataError, ModelError

# ------------------------------------------------------------------------------------------
# helpers: tiny files written by the tests


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def verl_row(i: int, question: str, answer: str, trace: str | None) -> dict:
    """A row in the verl / LUFFY schema of the paper's training data (PAPER.md section 3)."""
    return {
        "data_source": "openr1",
        "prompt": [{"role": "user", "content": question}],
        "target": [{"role": "assistant", "content": trace}] if trace is not None else [],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "train", "index": i},
    }


FLAT = [
    {"prompt": "What is 1+1?", "answer": "2"},
    {"prompt": "What is 2+3?", "answer": "\\boxed{5}"},
]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------
# formats and schemas


def test_verl_parquet_rows_map_to_questions(tmp_path):
    rows = [
        verl_row(7, "Add 2 and 2.", "4", "2+2=4. \\boxed{4}"),
        verl_row(8, "Halve 6.", "3", None),
    ]
    path = write_parquet(tmp_path / "train.parquet", rows)
    questions = load_questions(path)
    first, second = questions
    assert first == Question(
        id="7",
        prompt=[{"role": "user", "content": "Add 2 and 2."}],
        answer="4",
        demonstration="2+2=4. \\boxed{4}",
        source="openr1",
        meta={
            "ability": "math",
            "reward_model": rows[0]["reward_model"],
            "extra_info": rows[0]["extra_info"],
        },
    )
    assert second.demonstration is None and second.id == "8"


def test_flat_json_array_and_defaults(tmp_path):
    questions = load_questions(write_json(tmp_path / "AIME99" / "test.json", FLAT))
    assert [q.prompt for q in questions] == ["What is 1+1?", "What is 2+3?"]
    assert [q.answer for q in questions] == ["2", "\\boxed{5}"]
    # a split-named file takes its folder's name as the source; ids count rows from 0
    assert [q.id for q in questions] == ["AIME99-0", "AIME99-1"]
    assert {q.source for q in questions} == {"AIME99"}
    assert all(q.demonstration is None and q.meta == {} for q in questions)
    named = load_questions(write_json(tmp_path / "mine.json", FLAT))
    assert named[0].source == "mine" and named[1].id == "mine-1"


def test_json_object_holding_arrays(tmp_path):
    one = write_json(tmp_path / "one.json", {"version": 2, "data": FLAT})
    assert len(load_questions(one)) == 2
    several = write_json(tmp_path / "several.json", {"train": FLAT, "test": FLAT[:1]})
    assert len(load_questions(several, split="test")) == 1
    with pytest.raises(DataError, match=r"several\.json: .*several arrays \(train, test\)"):
        load_questions(several)


def test_jsonl_with_ids_sources_and_extra_fields(tmp_path):
    rows = [
        {"id": 11, "prompt": "p1", "answer": 3, "source": "s", "level": 2},
        {"id": "b", "prompt": "p2", "answer": 4.5},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    first, second = load_questions(path)
    assert (first.id, first.answer, first.source, first.meta) == ("11", "3", "s", {"level": 2})
    assert (second.id, second.answer, second.source) == ("b", "4.5", "d")


def test_common_alternative_names(tmp_path):
    rows = [
        {
            "problem": "Find x.",
            "solution": "x is 1, so \\boxed{1}.",
            "ground_truth": "1",
            "unique_id": "u1",
        }
    ]
    (q,) = load_questions(write_jsonl(tmp_path / "alt.jsonl", rows))
    assert (q.prompt, q.demonstration, q.answer, q.id) == (
        "Find x.",
        rows[0]["solution"],
        "1",
        "u1",
    )
    rows = [{"question": "Why?", "answer": "Because.", "response": "Because."}]
    (q,) = load_questions(write_jsonl(tmp_path / "alt2.jsonl", rows))
    assert (q.prompt, q.demonstration) == ("Why?", "Because.")


def test_field_mapping_with_dotted_paths(tmp_path):
    rows = [
        {
            "q": {"text": "Sum 1..3"},
            "meta": {"final": 6, "hard": True},
            "trace": "1+2+3=6",
            "answer": "wrong",
        },
    ]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    fields = {"prompt": "q.text", "answer": "meta.final", "demonstration": "trace", "meta": "meta"}
    (q,) = load_questions(path, fields=fields)
    assert (q.prompt, q.answer, q.demonstration) == ("Sum 1..3", "6", "1+2+3=6")
    # top-level fields not used whole stay in meta; the mapped meta object is merged in
    assert q.meta == {"q": {"text": "Sum 1..3"}, "final": 6, "hard": True, "answer": "wrong"}
    # list indices in paths
    (q,) = load_questions(
        write_jsonl(tmp_path / "l.jsonl", [{"p": "x", "a": ["7", "8"]}]),
        fields={"prompt": "p", "answer": "a.1"},
    )
    assert q.answer == "8"


def test_folders_splits_shards_and_limit(tmp_path):
    single = tmp_path / "single"
    write_json(single / "test.json", FLAT)
    (single / "notes.txt").write_text("not data")
    assert len(load_questions(single)) == 2
    assert load_questions(single, limit=1)[0].answer == "2"

    both = tmp_path / "both"
    write_jsonl(both / "train.jsonl", FLAT)
    write_jsonl(both / "test.jsonl", FLAT[:1])
    with pytest.raises(
        DataError, match=r"both: folder holds several data files \(test\.jsonl, train\.jsonl\)"
    ):
        load_questions(both)
    assert len(load_questions(both, split="test")) == 1
    with pytest.raises(DataError, match=r"no file for split 'dev'"):
        load_questions(both, split="dev")

    snapshot = tmp_path / "snapshot"  # a Hugging Face snapshot: data/<split>-0000N-of-0000M.parquet
    write_parquet(snapshot / "data" / "train-00000-of-00002.parquet", [verl_row(0, "a", "1", "t")])
    write_parquet(snapshot / "data" / "train-00001-of-00002.parquet", [verl_row(1, "b", "2", "t")])
    questions = load_questions(snapshot)
    assert [q.id for q in questions] == ["0", "1"]
    assert len(load_questions(snapshot, limit=1)) == 1


def test_benchmark_names_resolve_under_benchmark_dir(tmp_path, monkeypatch):
    write_json(tmp_path / "Toy-Bench" / "test.json", FLAT)
    monkeypatch.setenv("HPT_BENCHMARK_DIR", str(tmp_path))
    assert benchmark_dir() == tmp_path
    questions = load_questions("toy-bench")
    assert len(questions) == 2 and questions[0].source == "Toy-Bench"


def test_default_benchmark_dir_is_beside_the_repo(monkeypatch):
    monkeypatch.delenv("HPT_BENCHMARK_DIR", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert benchmark_dir() == repo.parent / "shared" / "benchmarks"


# ------------------------------------------------------------------------------------------
# malformed input: one line naming the file, the row and the field


def _bad_sources(tmp: Path) -> list[tuple[Path, dict, str]]:
    """(file, load_questions kwargs, regex the one-line error must match)."""
    jsonl = tmp / "rows.jsonl"
    jsonl.write_text(
        '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{"prompt": "c", answer}\n'
    )
    broken = tmp / "broken.json"
    broken.write_text('[{"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}]')
    empty = tmp / "empty.jsonl"
    empty.write_text("  \n")
    empty_array = write_json(tmp / "nothing.json", [])
    missing = write_json(tmp / "missing.json", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    no_prompt = write_json(tmp / "noprompt.json", [{"text": "a", "answer": "1"}])
    wrong_type = write_jsonl(
        tmp / "types.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": ["2"]}]
    )
    empty_prompt = write_json(
        tmp / "blank.json", [{"prompt": "a", "answer": "1"}, {"prompt": "   ", "answer": "1"}]
    )
    no_user = write_json(
        tmp / "nouser.json", [{"prompt": [{"role": "system", "content": "hi"}], "answer": "1"}]
    )
    bad_message = write_parquet(
        tmp / "msg.parquet", [{"prompt": [{"role": "user", "text": "hi"}], "answer": "1"}]
    )
    not_object = write_json(tmp / "strings.json", ["What is 1+1?"])
    mapped_missing = write_jsonl(
        tmp / "mapped.jsonl", [{"p": "x", "a": "1", "s": "y"}, {"p": "x", "a": "1"}]
    )
    bad_parquet = tmp / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    bad_demo = write_jsonl(
        tmp / "demo.jsonl",
        [{"prompt": "a", "answer": "1", "target": [{"role": "user", "content": "x"}]}],
    )
    return [
        (jsonl, {}, r"rows\.jsonl: line 3: invalid JSON"),
        (broken, {}, r"broken\.json: line 2 column \d+: invalid JSON"),
        (empty, {}, r"empty\.jsonl: empty file"),
        (empty_array, {}, r"nothing\.json: no rows"),
        (missing, {}, r"missing\.json: index 1: field 'answer' \(answer\): missing"),
        (
            no_prompt,
            {},
            r"noprompt\.json: index 0: no 'prompt' field \(looked for prompt, question, problem; the row has text, answer\)",
        ),
        (
            wrong_type,
            {},
            r"types\.jsonl: line 2: field 'answer' \(answer\): expected text or a number, got list",
        ),
        (empty_prompt, {}, r"blank\.json: index 1: field 'prompt' \(prompt\): empty prompt"),
        (no_user, {}, r"nouser\.json: index 0: field 'prompt' \(prompt\): empty prompt"),
        (
            bad_message,
            {},
            r"msg\.parquet: row index 0: field 'prompt' \(prompt\): message 0 needs string 'role' and 'content'",
        ),
        (not_object, {}, r"strings\.json: index 0: expected an object, got str"),
        (
            mapped_missing,
            {"fields": {"prompt": "p", "answer": "a", "source": "s"}},
            r"mapped\.jsonl: line 2: field 'source' \(s\): missing",
        ),
        (bad_parquet, {}, r"bad\.parquet: not a readable parquet file"),
        (
            bad_demo,
            {},
            r"demo\.jsonl: line 1: field 'demonstration' \(target\): chat messages hold no assistant message",
        ),
        (tmp / "absent.jsonl", {}, r"absent\.jsonl: no such file or folder"),
        (tmp / "no" / "such" / "dir", {}, r"no such file or folder"),
    ]


def test_malformed_inputs_raise_one_line_naming_the_place(tmp_path):
    for path, kwargs, pattern in _bad_sources(tmp_path):
        with pytest.raises(DataError) as excinfo:
            load_questions(path, **kwargs)
        message = one_line_error(excinfo)
        assert pytest.importorskip("re").search(pattern, message), (path.name, message)


def test_bad_arguments_raise_config_errors(tmp_path):
    path = write_json(tmp_path / "ok.json", FLAT)
    with pytest.raises(
        ConfigError, match=r"fields: unknown field 'question'; choose from id, prompt, answer"
    ):
        load_questions(path, fields={"question": "prompt"})
    with pytest.raises(ConfigError, match=r"fields: 'answer' must map to a dotted path"):
        load_questions(path, fields={"answer": ""})
    with pytest.raises(ConfigError, match="limit"):
        load_questions(path, limit=0)
    unknown = tmp_path / "data.csv"
    unknown.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown file type '\.csv'"):
        load_questions(unknown)


def test_hub_id_without_network_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as excinfo:
        load_questions("hpt-tests/no-such-dataset")
    assert time.perf_counter() - start < 20
    message = one_line_error(excinfo)
    assert message.startswith("hpt-tests/no-such-dataset: cannot load Hugging Face dataset")


# ------------------------------------------------------------------------------------------
# the shared evaluation sets (README.md of ../shared/benchmarks)

BENCHMARK_SIZES = {
    "AIME24": 30,
    "AIME25": 30,
    "AMC23": 40,
    "MATH-500": 500,
    "Minerva": 272,
    "Olympiad-Bench": 674,
    "GPQA": 198,
    "ARC-c": 1172,
}


@pytest.mark.parametrize("name", list(BENCHMARK_SIZES))
def test_shared_benchmarks_load(name):
    folder = benchmark_dir() / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    questions = load_questions(folder)
    assert len(questions) == BENCHMARK_SIZES[name]
    assert len({q.id for q in questions}) == len(questions)
    assert all(q.answer.strip() and question_text(q.prompt).strip() for q in questions)
    if name == "GPQA":
        assert {q.answer for q in questions} == {"A", "B", "C", "D"}
    if name == "ARC-c":  # a few ARC items label their choices 1-4
        assert {q.answer for q in questions} <= {"A", "B", "C", "D", "1", "2", "3", "4"}
    if name == "ARC-c":  # verl schema: chat messages with a system prompt first
        assert all(
            q.prompt[0]["role"] == "system" and q.prompt[-1]["role"] == "user" for q in questions
        )
    if name == "AIME24":
        assert any(q.answer.startswith("\\boxed{") for q in questions)


# ------------------------------------------------------------------------------------------
# tokenizers built offline for the prompt tests

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# a Llama-3-like template that writes its own BOS
BOS_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start|>' + message['role'] + '\\n\\n' + message['content'] + '<|eot|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start|>assistant\\n\\n' }}{%- endif %}"
)
# a template that rewrites the assistant's reply (keeps only what follows </think>)
STRIPPING_TEMPLATE = (
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Question: What is 12 plus 30? Answer: Let's think step by step. 12 + 30 = 42.",
    "The answer is \\boxed{42}. We add the numbers, then we divide.\n\nSo x = 7.",
    "system user assistant you are a helpful tutor",
]


def make_tokenizer(
    *, bos: str | None = None, eos: str = "<|im_end|>", template: str | None = CHATML
):
    """A small byte-level BPE wrapped as a transformers tokenizer; adds ``bos`` when it has one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|start|>", "<|eot|>", "<|begin|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer()


QUESTION = Question(
    id="q1", prompt="What is 12 plus 30?", answer="42", demonstration="12 + 30 = 42. \\boxed{42}"
)


def full_conversation_ids(tokenizer, builder: PromptBuilder, question: Question) -> list[int]:
    """The whole conversation's ids as the chat template renders it, cut after the first EOS of the reply."""
    messages = [
        *builder.messages(question),
        {"role": "assistant", "content": question.demonstration},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_length = len(builder.prompt_ids(question))
    end = ids.index(tokenizer.eos_token_id, prompt_length)
    return ids[: end + 1]


# ------------------------------------------------------------------------------------------
# prompt building


def test_chat_prompt_text_with_instruction_and_system_options(chatml):
    builder = PromptBuilder(chatml, instruction=BOXED_INSTRUCTION)
    expected = f"<|im_start|>user\nWhat is 12 plus 30?\n{BOXED_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert builder.prompt_text(QUESTION) == expected
    # the instruction is not added twice
    already = Question(id="x", prompt=f"What is 12 plus 30?\n{BOXED_INSTRUCTION}", answer="42")
    assert builder.prompt_text(already) == expected

    chat = Question(
        id="c",
        prompt=[{"role": "system", "content": "long rules"}, {"role": "user", "content": "Hi"}],
        answer="1",
    )
    assert (
        PromptBuilder(chatml)
        .prompt_text(chat)
        .startswith("<|im_start|>system\nlong rules<|im_end|>")
    )
    dropped = PromptBuilder(chatml, drop_system=True).prompt_text(chat)
    assert dropped == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    replaced = PromptBuilder(chatml, system_prompt="Be brief.").prompt_text(chat)
    assert (
        replaced
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        PromptBuilder(chatml, system_prompt="S")
        .prompt_text(QUESTION)
        .startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")
    )
    # the question itself is not modified
    assert chat.prompt[0]["content"] == "long rules"


def test_chat_demonstration_ids_end_with_eos_and_continue_the_prompt(chatml):
    builder = PromptBuilder(chatml, instruction=BOXED_INSTRUCTION)
    demo = builder.demonstration_ids(QUESTION)
    assert demo[-1] == chatml.eos_token_id and demo.count(chatml.eos_token_id) == 1
    assert builder.prompt_ids(QUESTION) + demo == full_conversation_ids(chatml, builder, QUESTION)
    assert chatml.decode(demo) == "12 + 30 = 42. \\boxed{42}<|im_end|>"


@settings(max_examples=40, deadline=None)
@given(
    text=st.text(alphabet="ab12 +=.\n\\{}xy", min_size=1, max_size=40).filter(lambda s: s.strip())
)
def test_prompt_plus_demonstration_is_the_conversation(chatml, text):
    builder = PromptBuilder(chatml)
    question = Question(id="h", prompt="What is x?", answer="1", demonstration=text)
    prompt, demo = builder.prompt_ids(question), builder.demonstration_ids(question)
    full = full_conversation_ids(chatml, builder, question)
    assert demo[-1] == chatml.eos_token_id
    assert chatml.decode(prompt + demo) == chatml.decode(full)
    if full[: len(prompt)] == prompt:  # no token merges across the boundary: identical ids
        assert prompt + demo == full


def test_eos_other_than_end_of_turn_is_appended(tmp_path):
    # Qwen2.5-Math base: eos is <|endoftext|> while a ChatML turn ends with <|im_end|>\n
    tokenizer = make_tokenizer(eos="<|endoftext|>")
    demo = PromptBuilder(tokenizer).demonstration_ids(QUESTION)
    assert tokenizer.decode(demo) == "12 + 30 = 42. \\boxed{42}<|im_end|><|endoftext|>"


def test_bos_appears_once(tmp_path):
    template_bos = make_tokenizer(bos="<|begin|>", eos="<|eot|>", template=BOS_TEMPLATE)
    bos = template_bos.bos_token_id
    builder = PromptBuilder(template_bos)
    ids = builder.prompt_ids(QUESTION)
    assert ids[0] == bos and ids.count(bos) == 1
    assert builder.prompt_ids(QUESTION) + builder.demonstration_ids(
        QUESTION
    ) == full_conversation_ids(template_bos, builder, QUESTION)
    # plain path: the tokenizer's BOS is added once, also when the template already writes it
    plain = PromptBuilder(template_bos, template="Q: {question}\nA:")
    assert plain.prompt_ids(QUESTION)[0] == bos and plain.prompt_ids(QUESTION).count(bos) == 1
    plain_with_bos = PromptBuilder(template_bos, template="<|begin|>Q: {question}\nA:")
    assert plain_with_bos.prompt_ids(QUESTION) == plain.prompt_ids(QUESTION)


def test_plain_llama_template(chatml):
    builder = PromptBuilder(chatml, template="llama")
    expected = (
        "Question:\nWhat is 12 plus 30?\nPlease reason step by step, and put your final answer within \\boxed{}."
        "\nAnswer:\nLet's think step by step."
    )
    assert (
        builder.prompt_text(QUESTION)
        == expected
        == PLAIN_TEMPLATES["llama"].replace("{question}", "What is 12 plus 30?")
    )
    assert not builder.uses_chat_template
    chat = Question(
        id="c",
        prompt=[
            {"role": "system", "content": "rules"},
            {"role": "user", "content": "What is 12 plus 30?"},
        ],
        answer="42",
    )
    assert builder.prompt_text(chat) == expected  # system messages are left out of plain prompts
    assert builder.prompt_ids(QUESTION) == chatml(expected, add_special_tokens=False)["input_ids"]
    demo = builder.demonstration_ids(QUESTION)
    assert demo == chatml(QUESTION.demonstration, add_special_tokens=False)["input_ids"] + [
        chatml.eos_token_id
    ]


def test_missing_chat_template_and_bad_template():
    bare = make_tokenizer(template=None)
    with pytest.raises(ModelError) as excinfo:
        PromptBuilder(bare)
    assert "no chat template; set template=" in one_line_error(excinfo)
    assert PromptBuilder(bare, template="llama").prompt_text(QUESTION).startswith("Question:\n")
    with pytest.raises(ConfigError, match=r"\{question\}"):
        PromptBuilder(bare, template="Solve: {problem}")


def test_demonstration_missing_or_rewritten_by_the_template(chatml):
    with pytest.raises(DataError, match="question 'n' has no demonstration"):
        PromptBuilder(chatml).demonstration_ids(Question(id="n", prompt="p", answer="1"))
    stripping = make_tokenizer(template=STRIPPING_TEMPLATE)
    question = Question(id="t", prompt="p", answer="1", demonstration="think</think>so 42")
    with pytest.warns(UserWarning, match="does not render the demonstration verbatim"):
        demo = PromptBuilder(stripping).demonstration_ids(question)
    assert stripping.decode(demo) == "think</think>so 42<|im_end|>"


def test_shared_tiny_tokenizer(tiny_dir):
    """The project's tiny model folder (hpt.demo.tiny), tokenizer reloaded from disk."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    builder = PromptBuilder(tokenizer, instruction=BOXED_INSTRUCTION)
    demo = builder.demonstration_ids(QUESTION)
    assert demo[-1] == tokenizer.eos_token_id
    assert builder.prompt_ids(QUESTION) + demo == full_conversation_ids(
        tokenizer, builder, QUESTION
    )


# ------------------------------------------------------------------------------------------
# over-long demonstrations


def _questions_with_demos() -> list[Question]:
    return [
        Question(id="short", prompt="p", answer="1", demonstration="So 42."),
        Question(
            id="long",
            prompt="p",
            answer="2",
            demonstration="We add the numbers, then we divide. " * 8,
        ),
        Question(id="none", prompt="p", answer="3"),
        Question(
            id="longer", prompt="p", answer="4", demonstration="The answer is \\boxed{42}. " * 12
        ),
    ]


def test_filter_drop_keeps_the_question_for_rl(chatml, caplog):
    builder = PromptBuilder(chatml)
    questions = _questions_with_demos()
    limit = len(builder.demonstration_ids(questions[0])) + 2
    with caplog.at_level(logging.WARNING, logger="hpt.data"):
        kept, report = filter_demonstrations(questions, builder, limit, policy="drop")
    assert report["over_limit"] == 2 and report["dropped"] == 2 and report["truncated"] == 0
    assert report["demonstrations"] == 3 and report["questions"] == 4 and report["longest"] > limit
    assert [q.id for q in kept] == ["short", "long", "none", "longer"]
    assert (
        kept[0].demonstration == "So 42."
        and kept[1].demonstration is None
        and kept[3].demonstration is None
    )
    assert kept[1].meta["demonstration_dropped"] and kept[1].answer == "2" and kept[1].prompt == "p"
    assert questions[1].demonstration is not None  # the input is not modified
    assert "2 of 3 demonstrations are longer than" in caplog.text and "'long'" in caplog.text


def test_filter_truncate_marks_and_cuts(chatml):
    builder = PromptBuilder(chatml)
    questions = _questions_with_demos()
    kept, report = filter_demonstrations(questions, builder, 10, policy="truncate")
    assert report["truncated"] == 2 and report["dropped"] == 0
    assert "truncated" not in kept[0].meta  # "So 42." fits
    long = kept[1]
    assert long.meta["truncated"] is True and long.demonstration == questions[1].demonstration
    ids = builder.demonstration_ids(long)
    assert len(ids) == 10 and ids[-1] != chatml.eos_token_id
    assert ids == builder.demonstration_ids(questions[1])[:10]
    # filtering again measures the untruncated length
    _, again = filter_demonstrations(kept, builder, 10, policy="truncate")
    assert again["over_limit"] == 2


def test_filter_measures_in_chunks_under_a_progress_bar(chatml, monkeypatch, capsys):
    builder = PromptBuilder(chatml)
    questions = _questions_with_demos()
    quiet = filter_demonstrations(questions, builder, 10, policy="truncate")
    monkeypatch.setenv("HPT_PROGRESS", "1")  # drawn although pytest's stderr is no terminal,
    monkeypatch.setenv("FORCE_COLOR", "1")  # and as on one (a transient bar is drawn, then erased)
    shown = filter_demonstrations(
        questions, builder, 10, policy="truncate", progress=True, chunk_size=2
    )
    assert shown == quiet  # chunks and the bar change nothing
    err = capsys.readouterr().err
    assert "measuring demonstrations" in err and "3/3" in err


def test_filter_error_and_bad_policy(chatml):
    builder = PromptBuilder(chatml)
    questions = _questions_with_demos()
    with pytest.raises(DataError) as excinfo:
        filter_demonstrations(questions, builder, 12, policy="error")
    assert one_line_error(excinfo).startswith(
        "2 of 3 demonstrations are longer than max_response_tokens=12 (first: question 'long'"
    )
    kept, report = filter_demonstrations(questions, builder, 10_000, policy="error")
    assert report["over_limit"] == 0 and kept == questions
    with pytest.raises(ConfigError, match="choose from drop, truncate, error"):
        filter_demonstrations(questions, builder, 12, policy="clip")
