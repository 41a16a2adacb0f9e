"""The Hugging Face rollout engine: shapes, order, stopping, padding, seeds and log-probs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hpt.errors import ConfigError
from hpt.rollout import HFEngine, Rollout, RolloutEngine, SamplingParams
from hpt.rollout.fused import mkl_packing

QUESTIONS = [
    "What is 2 + 3?",
    "Ann has 123 apples and buys 48 more. How many apples does she have now?",
    "Hi",
    "A box holds 57 pens. How many pens?",
]


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tokenizer = tiny

    def encode(content):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    encoded = [encode(q) for q in QUESTIONS]
    assert len({len(p) for p in encoded}) == len(encoded)  # different lengths: padding matters
    return encoded


def teacher_forced_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of the response tokens, from one unpadded forward pass. [T]"""
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(rollout.prompt_ids) - 1 : -1].float() / temperature
    targets = torch.tensor(rollout.response_ids)[:, None]
    return torch.log_softmax(logits, dim=-1).gather(1, targets).squeeze(1)


def test_shapes_and_prompt_major_order(tiny, prompts):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=5)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    rollouts = engine.generate(prompts, n=3, sampling=sampling)
    assert isinstance(engine, RolloutEngine)
    assert len(rollouts) == len(prompts) * 3
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(prompts)) for _ in range(3)]
    for r in rollouts:
        assert r.prompt_ids == prompts[r.prompt_index]
        assert 1 <= len(r.response_ids) <= 12
        assert len(r.logprobs) == len(r.response_ids)
        assert all(lp <= 0.0 for lp in r.logprobs)
        assert r.text == tokenizer.decode(r.response_ids, skip_special_tokens=True)
        assert r.finish_reason == (
            "stop" if r.response_ids[-1] == tokenizer.eos_token_id else "length"
        )
        assert tokenizer.pad_token_id not in r.response_ids or r.finish_reason == "length"
    # three samples of one prompt are not one sample copied three times
    assert len({tuple(r.response_ids) for r in rollouts[:3]}) > 1


def test_greedy_batched_equals_one_at_a_time(tiny, prompts):
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=0.0, max_new_tokens=16)
    batched = HFEngine(model, tokenizer, batch_size=8).generate(prompts, 1, sampling)
    single = HFEngine(model, tokenizer, batch_size=1).generate(prompts, 1, sampling)
    for b, s in zip(batched, single):
        assert b.response_ids == s.response_ids
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)


def test_greedy_logprobs_are_the_models(tiny, prompts):
    model, tokenizer = tiny
    rollouts = HFEngine(model, tokenizer).generate(
        prompts, 2, SamplingParams(0.0, max_new_tokens=10)
    )
    assert rollouts[0].response_ids == rollouts[1].response_ids  # greedy: n identical copies
    for r in rollouts:
        expected = teacher_forced_logprobs(model, r)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4)
        # greedy picks the most likely token at each step
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1]
        assert logits.argmax(-1).tolist() == r.response_ids


def test_sampled_logprobs_follow_the_temperature(tiny, prompts):
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=0.7, max_new_tokens=10, seed=1)
    for r in HFEngine(model, tokenizer).generate(prompts[:2], 2, sampling):
        expected = teacher_forced_logprobs(model, r, temperature=0.7)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4)


def test_top_p_samples_stay_in_the_nucleus(tiny, prompts):
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=1.0, top_p=0.3, max_new_tokens=10, seed=2)
    for r in HFEngine(model, tokenizer).generate(prompts, 2, sampling):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            probs = model(ids).logits[0, len(r.prompt_ids) - 1 : -1].softmax(-1)
        for step, token in enumerate(r.response_ids):
            more_likely = probs[step][probs[step] > probs[step, token]].sum()
            assert more_likely < 0.3 + 1e-5
        # the renormalised nucleus gives each token at least its own probability
        own = teacher_forced_logprobs(model, r)
        assert all(lp >= o - 1e-5 for lp, o in zip(r.logprobs, own.tolist()))


def test_top_k_one_is_greedy(tiny, prompts):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=12))
    top1 = engine.generate(
        prompts, 1, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=12, seed=5)
    )
    assert [r.response_ids for r in top1] == [r.response_ids for r in greedy]
    assert all(lp == pytest.approx(0.0, abs=1e-6) for r in top1 for lp in r.logprobs)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(tiny, prompts):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=4)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)
    torch.manual_seed(0)
    first = engine.generate(prompts, 2, sampling)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    again = engine.generate(prompts, 2, sampling)
    assert torch.equal(state, torch.get_rng_state())
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    other = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=12, seed=12))
    assert [r.response_ids for r in other] != [r.response_ids for r in first]


def test_stops_at_the_first_eos_and_keeps_it(tiny, prompts):
    model, tokenizer = tiny
    free = HFEngine(model, tokenizer).generate(prompts, 1, SamplingParams(0.0, max_new_tokens=12))
    response = free[1].response_ids
    assert free[1].finish_reason == "length" and len(response) == 12
    stop = response[4]
    first = response.index(stop)
    # a tokenizer whose EOS is a token the model will generate: the engine must stop there
    fake = SimpleNamespace(
        eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, decode=tokenizer.decode
    )
    stopped = HFEngine(model, fake).generate(prompts, 1, SamplingParams(0.0, max_new_tokens=12))[1]
    assert stopped.response_ids == response[: first + 1]
    assert stopped.finish_reason == "stop"
    assert len(stopped.logprobs) == first + 1
    # extra stop ids work the same way, alongside the tokenizer's EOS
    extra = HFEngine(model, tokenizer, stop_token_ids=[stop]).generate(
        prompts, 1, SamplingParams(0.0, max_new_tokens=12)
    )[1]
    assert extra.response_ids == stopped.response_ids and extra.finish_reason == "stop"


def test_model_mode_and_generation_config_are_restored(tiny, prompts):
    model, tokenizer = tiny
    saved_config = model.generation_config
    model.train()
    try:
        HFEngine(model, tokenizer).generate(prompts[:1], 1, SamplingParams(0.0, max_new_tokens=3))
        assert model.training
        assert model.generation_config is saved_config
    finally:
        model.eval()


def test_progress_bar_does_not_change_results(tiny, prompts):
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    quiet = HFEngine(model, tokenizer, batch_size=2).generate(prompts, 2, sampling)
    shown = HFEngine(model, tokenizer, batch_size=2, progress=True).generate(prompts, 2, sampling)
    assert [r.response_ids for r in quiet] == [r.response_ids for r in shown]


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)],
)
def test_bad_sampling_params_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_bad_generate_arguments_are_config_errors(tiny, prompts):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    with pytest.raises(ConfigError, match="n must be"):
        engine.generate(prompts, 0, SamplingParams())
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        engine.generate([prompts[0], []], 1, SamplingParams())
    with pytest.raises(ConfigError, match="batch_size"):
        HFEngine(model, tokenizer, batch_size=0)


@pytest.mark.slow
def test_smollm2_generates_chat_responses():
    from hpt.demo.tiny import load_smollm2

    model, tokenizer = load_smollm2()
    questions = ["What is 2 + 3? Answer briefly.", "Name a colour."]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    engine = HFEngine(model, tokenizer, batch_size=8)
    greedy = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=48))
    assert any(r.finish_reason == "stop" for r in greedy)
    for r in greedy:
        assert r.text.strip()
        if r.finish_reason == "stop":
            assert r.response_ids[-1] == tokenizer.eos_token_id
            assert tokenizer.eos_token_id not in r.response_ids[:-1]
    single = HFEngine(model, tokenizer, batch_size=1).generate(
        prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=48)
    )
    assert [r.response_ids for r in single] == [r.response_ids for r in greedy]
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=24, seed=0)
    first, again = engine.generate(prompts, 2, sampling), engine.generate(prompts, 2, sampling)
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    assert [r.prompt_index for r in first] == [0, 0, 1, 1]


def test_engine_registry_and_missing_vllm_error(tiny):
    """`rollout.engine` picks an engine by name; vLLM, when absent, is one clear ConfigError."""
    import importlib.util

    from hpt.errors import ConfigError
    from hpt.rollout import HFEngine, make_engine

    model, tokenizer = tiny
    assert isinstance(make_engine("hf", model, tokenizer, batch_size=4, model_path="x"), HFEngine)
    with pytest.raises(ConfigError, match="unknown rollout engine"):
        make_engine("nope", model, tokenizer)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="needs vLLM"):
            make_engine("vllm", model, tokenizer, model_path="x")


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_training_logprobs_equal_engine_logprobs(tiny, prompts, temperature):
    """The trainer's Policy, at the rollout temperature, scores rollouts as the engine sampled them."""
    from hpt.estimator.unified import KIND_ID
    from hpt.train.batch import Row, collate
    from hpt.train.policy import Policy

    model, tokenizer = tiny
    sampling = SamplingParams(temperature=temperature, max_new_tokens=12, seed=3)
    rollouts = HFEngine(model, tokenizer).generate(prompts, 2, sampling)
    rows = [Row(r.prompt_ids, r.response_ids, "rollout", i, 0.0) for i, r in enumerate(rollouts)]
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    with torch.no_grad():
        trained, _, _ = Policy(model, temperature=temperature)(*args)
        at_one, _, _ = Policy(model)(*args)
    engine = torch.zeros_like(trained)
    for i, r in enumerate(rollouts):
        engine[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    mask = batch.response_mask
    assert torch.allclose(trained[mask], engine[mask], atol=1e-4)
    gap = (at_one[mask] - engine[mask]).abs().max()
    if temperature != 1.0:  # training at T = 1 on T = 0.7 samples is the bug this guards against
        assert gap > 1e-2


# ---------------------------------------------------------------------------------------------
# the lean decode loop (hpt.rollout.decode) against model.generate and the distribution it samples


def common_token(model, tokenizer, prompts, steps=12):
    """A token that greedy decoding produces early in some responses and not in others."""
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(prompts, 1, SamplingParams(0.0, max_new_tokens=steps))
    counts: dict[int, int] = {}
    for r in greedy:
        for token in set(r.response_ids[: steps // 2]):
            counts[token] = counts.get(token, 0) + 1
    return max((c, t) for t, c in counts.items() if c < len(prompts))[1]


def test_greedy_equals_generate_and_the_generate_engine_with_early_stops(tiny, prompts):
    """Rows of different lengths, some stopping early (so the batch is compacted), as generate."""
    model, tokenizer = tiny
    stop = common_token(model, tokenizer, prompts)
    fake = SimpleNamespace(
        eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, decode=tokenizer.decode
    )
    engine = HFEngine(model, fake, batch_size=8)
    assert engine.decoder is not None  # the lean loop, not generate
    sampling = SamplingParams(0.0, max_new_tokens=14)
    lean = engine.generate(prompts, 1, sampling)
    assert {r.finish_reason for r in lean} == {"stop", "length"}
    old = HFEngine(model, fake, batch_size=8)
    old.decoder = None  # today's path: model.generate with logits processors
    for a, b in zip(lean, old.generate(prompts, 1, sampling)):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    for r in lean:  # and model.generate itself, one prompt at a time
        out = model.generate(
            torch.tensor([r.prompt_ids]),
            do_sample=False,
            max_new_tokens=14,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert out[0, len(r.prompt_ids) :].tolist()[: len(r.response_ids)] == r.response_ids


def test_sampled_logprobs_stay_aligned_when_rows_leave_the_batch(tiny, prompts):
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=0.8, max_new_tokens=16, seed=4)
    free = HFEngine(model, tokenizer, batch_size=16).generate(prompts, 4, sampling)
    counts = torch.bincount(torch.tensor([t for r in free for t in r.response_ids[2:]]))
    stops = counts.topk(2).indices.tolist()  # frequent tokens: many rows stop early on them
    rollouts = HFEngine(model, tokenizer, batch_size=16, stop_token_ids=stops).generate(
        prompts, 4, sampling
    )
    early = [r for r in rollouts if r.finish_reason == "stop" and len(r.response_ids) < 16]
    assert len(early) >= 4  # a quarter of the batch: it was compacted
    assert any(r.finish_reason == "length" for r in rollouts)
    for r in rollouts:
        assert not set(stops) & set(r.response_ids[:-1])
        expected = teacher_forced_logprobs(model, r, temperature=0.8)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4)


def test_first_token_frequencies_match_the_softmax_at_t(tiny, prompts):
    """Chi-square: 3000 first tokens at T = 0.1 against softmax(logits / T); T = 0.13 fails it."""
    model, tokenizer = tiny
    temperature, draws = 0.1, 3000  # the random model is near uniform; 0.1 gives it a shape
    sampling = SamplingParams(temperature=temperature, max_new_tokens=1, seed=9)
    engine = HFEngine(model, tokenizer, batch_size=1000)
    first = [r.response_ids[0] for r in engine.generate(prompts[:1], draws, sampling)]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1].float()
    observed = torch.bincount(torch.tensor(first), minlength=logits.numel()).double()

    def chi_square(probs: torch.Tensor) -> tuple[float, float]:
        expected = probs.double() * draws
        big = expected >= 5  # pool the rare tokens into one cell
        cells_obs = torch.cat([observed[big], observed[~big].sum()[None]])
        cells_exp = torch.cat([expected[big], expected[~big].sum()[None]])
        stat = float(((cells_obs - cells_exp) ** 2 / cells_exp.clamp(min=1e-9)).sum())
        df = int(big.sum())  # cells - 1
        return stat, df + 4 * (2 * df) ** 0.5  # about the 0.999 quantile of chi2(df)

    stat, limit = chi_square(torch.softmax(logits / temperature, -1))
    assert stat < limit
    wrong, wrong_limit = chi_square(torch.softmax(logits / 0.13, -1))  # it tells T apart
    assert wrong > wrong_limit


def test_top_k_samples_stay_in_the_top_k(tiny, prompts):
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=1.5, top_k=3, max_new_tokens=8, seed=6)
    for r in HFEngine(model, tokenizer).generate(prompts, 3, sampling):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1].float()
        top = logits.topk(3, dim=-1).indices
        assert all(token in top[step].tolist() for step, token in enumerate(r.response_ids))
        # the log-prob is that of the renormalised top-3 at T = 1.5
        kept = (logits / 1.5).gather(1, top).log_softmax(-1)
        position = (top == torch.tensor(r.response_ids)[:, None]).float().argmax(-1)
        expected = kept.gather(1, position[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4)


def test_min_new_tokens_forces_full_length(tiny, prompts):
    model, tokenizer = tiny
    stop = common_token(model, tokenizer, prompts)
    fake = SimpleNamespace(
        eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, decode=tokenizer.decode
    )
    sampling = SamplingParams(0.0, max_new_tokens=10)
    for r in HFEngine(model, fake, min_new_tokens=10).generate(prompts, 1, sampling):
        assert len(r.response_ids) == 10 and stop not in r.response_ids
        assert r.finish_reason == "length"


def test_peft_wrapped_model_decodes_like_its_generate(tiny, prompts):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    torch.manual_seed(0)
    lora = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    engine = HFEngine(lora, tokenizer)
    assert engine.decoder is not None
    rollouts = engine.generate(prompts, 1, SamplingParams(0.0, max_new_tokens=8))
    base = HFEngine(model, tokenizer).generate(prompts, 1, SamplingParams(0.0, max_new_tokens=8))
    assert [r.response_ids for r in rollouts] != [r.response_ids for r in base]  # LoRA is live
    for r in rollouts:
        out = lora.generate(
            input_ids=torch.tensor([r.prompt_ids]),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert out[0, len(r.prompt_ids) :].tolist()[: len(r.response_ids)] == r.response_ids


def test_models_without_a_steppable_forward_fall_back_to_generate(tiny, prompts):
    from hpt.rollout.decode import forward_signature

    model, tokenizer = tiny

    class NoPositions(torch.nn.Module):  # forward without position_ids or a cache
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.generation_config = (
                inner,
                inner.config,
                inner.generation_config,
            )

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

        def generate(self, **kwargs):  # with the config the engine set on the wrapper
            return self.inner.generate(**kwargs, generation_config=self.generation_config)

    wrapped = NoPositions(model)
    assert forward_signature(wrapped) is None
    engine = HFEngine(wrapped, tokenizer)
    assert engine.decoder is None
    sampling = SamplingParams(0.0, max_new_tokens=6)
    lean = HFEngine(model, tokenizer).generate(prompts, 1, sampling)
    assert [r.response_ids for r in engine.generate(prompts, 1, sampling)] == [
        r.response_ids for r in lean
    ]


def frequent_tokens(model, tokenizer, prompts, sampling, k=2):
    """Tokens sampled often: as stop tokens, many rows stop early on them."""
    free = HFEngine(model, tokenizer, batch_size=16).generate(prompts, 4, sampling)
    counts = torch.bincount(torch.tensor([t for r in free for t in r.response_ids[2:]]))
    return counts.topk(k).indices.tolist()


@pytest.mark.parametrize("lean", [True, False])
def test_on_finished_reports_each_rollout_once_and_early_ones_first(tiny, prompts, lean):
    """Rows that stop early are handed on while the rest still decode; nothing is lost."""
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=0.8, max_new_tokens=16, seed=4)
    stops = frequent_tokens(model, tokenizer, prompts, sampling)
    engine = HFEngine(model, tokenizer, batch_size=16, stop_token_ids=stops)
    if not lean:
        engine.decoder = None  # model.generate: a batch is reported when it ends
    calls: list[list[tuple[int, Rollout]]] = []
    rollouts = engine.generate(prompts, 4, sampling, on_finished=calls.append)
    reported = [pair for call in calls for pair in call]
    assert sorted(i for i, _ in reported) == list(range(len(rollouts)))  # each index once
    for index, rollout in reported:
        assert rollout == rollouts[index]
    plain = HFEngine(model, tokenizer, batch_size=16, stop_token_ids=stops)
    if not lean:
        plain.decoder = None
    assert plain.generate(prompts, 4, sampling) == rollouts  # reporting changes nothing
    if lean:  # the first report came while longer rows were still decoding
        assert len(calls) > 1
        first = [r for _, r in calls[0]]
        assert all(r.finish_reason == "stop" for r in first)
        assert max(len(r.response_ids) for r in first) < max(len(r.response_ids) for r in rollouts)
    else:  # one report per batch of 16 rows
        assert [len(call) for call in calls] == [16] * (len(rollouts) // 16)


def test_on_finished_with_greedy_copies(tiny, prompts):
    model, tokenizer = tiny
    calls: list[list[tuple[int, Rollout]]] = []
    engine = HFEngine(model, tokenizer)
    rollouts = engine.generate(
        prompts, 3, SamplingParams(0.0, max_new_tokens=5), on_finished=calls.append
    )
    reported = dict(pair for call in calls for pair in call)
    assert sorted(reported) == list(range(3 * len(prompts)))
    assert [reported[i] for i in range(len(rollouts))] == rollouts


def test_streams_finished_reads_the_engines_signature(tiny):
    from hpt.rollout import streams_finished

    model, tokenizer = tiny

    class Plain:
        def generate(self, prompts, n, sampling):
            return []

    assert streams_finished(HFEngine(model, tokenizer))
    assert not streams_finished(Plain())
    assert not streams_finished(object())


# --- the fused Llama-layout decode step -----------------------------------------------------------


def tiny_llama(tokenizer, **config):
    """A random Llama (no biases, llama3 rope scaling) with the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
        **config,
    )
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "llama-biases"])
def test_fused_step_decodes_as_the_models_forward(tiny, prompts, arch):
    """Greedy tokens identical and log-probs to 1e-5, with rows leaving the batch early."""
    from hpt.rollout.fused import fusable

    model, tokenizer = tiny
    if arch != "qwen2":
        biases = {"attention_bias": True, "mlp_bias": True} if arch == "llama-biases" else {}
        model = tiny_llama(tokenizer, **biases)
    assert fusable(model)
    sampling = SamplingParams(0.0, max_new_tokens=14)
    stop = common_token(model, tokenizer, prompts)
    fused = HFEngine(model, tokenizer, batch_size=8, stop_token_ids=[stop])
    plain = HFEngine(model, tokenizer, batch_size=8, stop_token_ids=[stop], fused=False)
    assert fused.decoder.fused is not None and plain.decoder.fused is None
    a, b = fused.generate(prompts, 1, sampling), plain.generate(prompts, 1, sampling)
    assert {r.finish_reason for r in b} == {"stop", "length"}
    for x, y in zip(a, b):
        assert x.response_ids == y.response_ids and x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    sampled = SamplingParams(temperature=0.9, max_new_tokens=10, seed=2)
    x, y = fused.generate(prompts, 3, sampled), plain.generate(prompts, 3, sampled)
    assert [r.response_ids for r in x] == [r.response_ids for r in y]  # same draws, same seed
    assert fused.exact_logprobs(sampled)


def graphed_pair(model, tokenizer, eager, **options):
    """Two engines on ``model``: the eager fused step, and the same step through GraphedStep."""
    from hpt.rollout.graphs import GraphedStep

    plain = HFEngine(model, tokenizer, batch_size=8, **options)
    graphed = HFEngine(model, tokenizer, batch_size=8, cuda_graphs=True, **options)
    assert plain.decoder.graphed is None and graphed.decoder.fused is not None
    graphed.decoder.graphed = GraphedStep(graphed.decoder.fused, eager=eager)
    return plain, graphed


def assert_graphed_decodes_as_eager(model, tokenizer, prompts, plain, graphed, tolerance):
    graphs = graphed.decoder.graphed
    sampling = SamplingParams(0.0, max_new_tokens=14)
    a, b = graphed.generate(prompts, 1, sampling), plain.generate(prompts, 1, sampling)
    assert {r.finish_reason for r in b} == {"stop", "length"}  # rows left the batch early
    for x, y in zip(a, b):
        assert x.response_ids == y.response_ids and x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=tolerance)
    # one capture for the batch, one more after the compaction (new cache tensors, fewer rows)
    assert graphs.captures == 2
    assert graphs._capture is None  # released with the batch: no reference to its cache
    sampled = SamplingParams(temperature=0.9, max_new_tokens=10, seed=2)
    x, y = graphed.generate(prompts, 3, sampled), plain.generate(prompts, 3, sampled)
    assert [r.response_ids for r in x] == [r.response_ids for r in y]  # same draws, same seed


@pytest.mark.parametrize("arch", ["qwen2", "llama-biases"])
def test_graphed_step_buffers_decode_as_the_eager_step(tiny, prompts, arch):
    """GraphedStep's static buffers (full-length mask, slot-written cache, recapture when rows
    leave the batch) with the step run eagerly on them: the eager fused step's tokens."""
    model, tokenizer = tiny
    if arch != "qwen2":
        model = tiny_llama(tokenizer, attention_bias=True, mlp_bias=True)
    stop = common_token(model, tokenizer, prompts)
    # no stop before token 3: rows leave the batch after the first capture (a recapture)
    options = dict(stop_token_ids=[stop], min_new_tokens=3)
    plain, graphed = graphed_pair(model, tokenizer, eager=True, **options)
    assert_graphed_decodes_as_eager(model, tokenizer, prompts, plain, graphed, 1e-5)


def test_a_graph_that_does_not_replay_its_step_turns_graphs_off(tiny, prompts):
    """A capture whose replay disagrees with the eager run of the same step (as a broken graph
    would) is dropped with one warning, and the eager step decodes the same tokens as without."""
    model, tokenizer = tiny
    plain, graphed = graphed_pair(model, tokenizer, eager=True)
    step = graphed.decoder.graphed
    calls = []

    class Noisy:  # the fused step, off by 1 on its second call: the check's replay
        def __init__(self, fused):
            self.fused = fused

        def __call__(self, *args, **kwargs):
            calls.append(1)
            logits = self.fused(*args, **kwargs)
            return logits + 1.0 if len(calls) == 2 else logits

        def refresh(self, rows=0):
            self.fused.refresh(rows)

        def unpack(self):
            self.fused.unpack()

    step.fused = Noisy(step.fused)
    sampling = SamplingParams(0.0, max_new_tokens=6)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the decode step failed"):
        a = graphed.generate(prompts, 1, sampling)
    assert step.failure is not None and "GraphMismatch" in step.failure
    assert [r.response_ids for r in a] == [
        r.response_ids for r in plain.generate(prompts, 1, sampling)
    ]
    assert step.captures == 1  # no further capture once off


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_cuda_graph_step_decodes_as_the_eager_step(tiny, prompts, dtype):
    """On a GPU: the fused step replayed from real CUDA graphs gives the eager step's tokens."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model).cuda()
    stop = common_token(model, tokenizer, prompts)
    options = dict(stop_token_ids=[stop], min_new_tokens=3, dtype=dtype)
    plain, graphed = graphed_pair(model, tokenizer, eager=False, **options)
    assert_graphed_decodes_as_eager(
        model, tokenizer, prompts, plain, graphed, 1e-5 if dtype is None else 1e-2
    )
    # asked for, the engine uses the graphed step on a CUDA device
    assert HFEngine(model, tokenizer, cuda_graphs=True).decoder.graphed is not None
    # on a GPU the step's weight copies are dropped with the batch (the update can use the memory)
    assert graphed.decoder.fused._buffers == {} and graphed.decoder.fused.layers == []


def test_released_fused_step_refills_its_copies(tiny, prompts):
    """release() (what the decoder does after a batch on a GPU) drops the bf16 copies; the next
    batch refills them and decodes the same tokens."""
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, dtype="bfloat16")
    sampling = SamplingParams(0.0, max_new_tokens=6)
    before = engine.generate(prompts, 1, sampling)
    fused = engine.decoder.fused
    assert fused._buffers  # kept on a CPU
    fused.release()
    assert fused._buffers == {} and fused.layers == [] and fused.head_weight is None
    after = engine.generate(prompts, 1, sampling)
    assert [r.response_ids for r in after] == [r.response_ids for r in before]
    assert fused._buffers


def test_cuda_graphs_are_an_engine_option(tiny):
    model, tokenizer = tiny
    assert HFEngine(model, tokenizer).decoder.graphed is None  # opt-in (not yet confirmed on a GPU)
    assert HFEngine(model, tokenizer, cuda_graphs=True).decoder.graphed is not None  # CUDA only
    graphs_without_fused = HFEngine(model, tokenizer, cuda_graphs=True, fused=False)
    assert graphs_without_fused.decoder.graphed is None  # it replays the fused step
    # why the key, asked for, replays nothing here (the recipe logs it as a warning)
    assert HFEngine(model, tokenizer).cuda_graphs_unused() is None  # not asked for
    assert "decodes through its forward" in graphs_without_fused.cuda_graphs_unused()
    compiled = HFEngine(model, tokenizer, cuda_graphs=True, compile=True)
    assert "decodes through its forward" in compiled.cuda_graphs_unused()
    on_cpu = HFEngine(model, tokenizer, cuda_graphs=True).cuda_graphs_unused()
    assert on_cpu == "the model is on cpu; CUDA graphs replay on CUDA devices only"


def test_fused_step_reads_the_weights_of_each_batch(tiny, prompts):
    """Training changes the weights between generate calls: the fused step follows them."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    fused = HFEngine(model, tokenizer)
    plain = HFEngine(model, tokenizer, fused=False)
    sampling = SamplingParams(0.0, max_new_tokens=8)
    before = fused.generate(prompts, 1, sampling)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(-3.0)
            layer.self_attn.k_proj.bias.add_(0.5)
    after = fused.generate(prompts, 1, sampling)
    assert [r.response_ids for r in after] == [
        r.response_ids for r in plain.generate(prompts, 1, sampling)
    ]
    assert [r.response_ids for r in after] != [r.response_ids for r in before]


def test_fusable_refuses_other_layouts(tiny):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from hpt.rollout.fused import fusable

    model, tokenizer = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    assert not fusable(gpt2)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not fusable(lora)
    assert HFEngine(lora, tokenizer).decoder.fused is None  # adapters: the model's forward
    from peft import inject_adapter_in_model

    injected = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["v_proj"]), copy.deepcopy(model)
    )  # adapters in a plain model, no PEFT wrapper
    assert not fusable(injected)
    windowed = copy.deepcopy(model)
    windowed.config.use_sliding_window, windowed.config.sliding_window = True, 16
    assert not fusable(windowed)


def test_bf16_rollouts_sample_near_the_fp32_policy(tiny, prompts):
    """A bf16 copy of the weights: log-probs near the model's, and not taken as pi_old."""
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    engine = HFEngine(model, tokenizer, dtype="bfloat16")
    assert not engine.exact_logprobs(sampling)
    rollouts = engine.generate(prompts, 2, sampling)
    assert engine.decoder.fused.head_weight.dtype == torch.bfloat16
    for r in rollouts:
        exact = teacher_forced_logprobs(model, r)
        assert (torch.tensor(r.logprobs) - exact).abs().max() < 0.1  # bf16 rounding, not a bug
    with pytest.raises(ConfigError, match="fused"):
        HFEngine(model, tokenizer, dtype="bfloat16", fused=False)
    with pytest.raises(ConfigError, match="rollout dtype"):
        HFEngine(model, tokenizer, dtype="int8")
    assert HFEngine(model, tokenizer, dtype="auto").exact_logprobs(sampling)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_joined_projections_decode_as_separate_ones(tiny, prompts, arch):
    """A bf16 step's q/k/v and gate/up cast into one copy each: the tokens of separate copies."""
    model, tokenizer = tiny
    if arch == "llama":
        model = tiny_llama(tokenizer)  # no biases
    sampling = SamplingParams(0.0, max_new_tokens=10)
    joined = HFEngine(model, tokenizer, dtype="bfloat16")
    separate = HFEngine(model, tokenizer, dtype="bfloat16")
    separate.decoder.fused.join = False
    a, b = joined.generate(prompts, 1, sampling), separate.generate(prompts, 1, sampling)
    assert joined.decoder.fused.layers[0].qkv is not None
    assert separate.decoder.fused.layers[0].qkv is None
    for x, y in zip(a, b):
        assert x.response_ids == y.response_ids
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-2)  # bf16 matmuls blocked otherwise


def test_copies_of_a_prompt_are_prefilled_once(tiny, prompts, monkeypatch):
    """n samples of a prompt share one prefill (its cache copied to every copy): the same tokens
    and log-probs as prefilling every row."""
    import hpt.rollout.decode as decode

    assert decode.distinct_rows([[1, 2], [3], [1, 2], [3], [4]]) == ([0, 1, 4], [0, 1, 0, 1, 2])
    model, tokenizer = tiny
    sampling = SamplingParams(temperature=0.9, max_new_tokens=12, seed=7)
    calls: list[int] = []
    engine = HFEngine(model, tokenizer, batch_size=64)
    forward = engine.decoder._forward_last

    def counted(input_ids, *args):
        calls.append(input_ids.shape[0])
        return forward(input_ids, *args)

    monkeypatch.setattr(engine.decoder, "_forward_last", counted)
    shared = engine.generate(prompts, 4, sampling)
    assert calls == [len(prompts)]  # one prefill row per distinct prompt
    monkeypatch.setattr(
        decode, "distinct_rows", lambda p: (list(range(len(p))), list(range(len(p))))
    )
    each = engine.generate(prompts, 4, sampling)
    assert calls[-1] == 4 * len(prompts)
    assert [r.response_ids for r in shared] == [r.response_ids for r in each]
    for a, b in zip(shared, each):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_fused_step_reads_the_weights_without_copying_them(tiny):
    """In the model's dtype the fused step holds the model's own tensors; a bf16 step casts into
    buffers allocated once, which follow the weights' updates."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    attention = model.model.layers[0].self_attn
    same = HFEngine(model, tokenizer).decoder.fused
    same.refresh()
    assert same.layers[0].q[0].data_ptr() == attention.q_proj.weight.data_ptr()
    assert (
        same.layers[0].gate[0].data_ptr() == model.model.layers[0].mlp.gate_proj.weight.data_ptr()
    )
    low = HFEngine(model, tokenizer, dtype="bfloat16").decoder.fused
    low.refresh()
    assert low.layers[0].q is None  # q, k and v cast into one concatenated copy
    pointer = low.layers[0].qkv[0].data_ptr()
    with torch.no_grad():
        attention.q_proj.weight.add_(1.0)
    low.refresh()
    weight, bias = low.layers[0].qkv
    assert weight.data_ptr() == pointer  # the same buffer, refilled
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    torch.testing.assert_close(weight, torch.cat([m.weight for m in projections]).bfloat16())
    torch.testing.assert_close(bias, torch.cat([m.bias for m in projections]).bfloat16())
    mlp = model.model.layers[0].mlp
    gate_up = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).bfloat16()
    torch.testing.assert_close(low.layers[0].gate_up[0], gate_up)
    # tied embeddings: the head's cast is the embedding's buffer, not a second copy
    assert low.head_weight.data_ptr() == low._cast(model.model.embed_tokens.weight).data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_inverts_the_float64_cdf_and_leaves_its_input_alone(dtype):
    from hpt.rollout.decode import draw

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 500, generator=generator, dtype=dtype) * 3
    logits[:, ::7] = float("-inf")  # tokens of probability 0
    logprobs = torch.log_softmax(logits, dim=-1)
    before = logprobs.clone()
    torch.manual_seed(11)
    tokens = draw(logprobs, greedy=False)
    assert torch.equal(logprobs, before)  # the in-place cdf is a copy, also of float64 input
    torch.manual_seed(11)  # the formula written out, on the same uniform numbers
    cdf = logprobs.double().exp().cumsum(dim=-1)
    u = torch.rand((64, 1), dtype=torch.float64) * cdf[:, -1:]
    expected = torch.searchsorted(cdf, u, right=True).squeeze(1)
    assert torch.equal(tokens, expected)
    assert torch.isfinite(logprobs.gather(1, tokens[:, None])).all()  # never a token of p = 0


@pytest.mark.skipif(not mkl_packing(), reason="this PyTorch has no MKL packed GEMM")
def test_compaction_repacks_the_weights_for_the_rows_left(tiny, prompts):
    """When rows leave a packed batch with at least PACK_MIN_TOKENS steps to go, the weights
    are packed again for the rows left (MKL's packed GEMM computes for the row count it was
    packed for); the tokens and log-probs stay the plain step's."""
    from hpt.rollout.decode import PACK_MIN_TOKENS

    model, tokenizer = tiny
    stop = common_token(model, tokenizer, prompts)
    options = dict(batch_size=8, stop_token_ids=[stop], min_new_tokens=3)
    packed, plain = HFEngine(model, tokenizer, **options), HFEngine(model, tokenizer, **options)
    plain.decoder.fused.pack = False
    step = packed.decoder.fused
    packs, used = [], []  # the row counts packed for; the rows of each packed matmul's input
    pack, linear = step._pack, step._linear
    step._pack = lambda rows: packs.append(rows) or pack(rows)

    def counting_linear(x, projection):
        if step._packed.get(id(projection[0])) is not None and x.shape[0] == step._packed_rows:
            used.append(x.shape[0])
        return linear(x, projection)

    step._linear = counting_linear
    sampling = SamplingParams(0.0, max_new_tokens=3 * PACK_MIN_TOKENS)
    a, b = packed.generate(prompts, 1, sampling), plain.generate(prompts, 1, sampling)
    lengths = sorted(len(r.response_ids) for r in b)
    assert lengths[0] < 2 * PACK_MIN_TOKENS and lengths[-1] == 3 * PACK_MIN_TOKENS
    assert packs[0] == len(prompts) and len(packs) >= 2  # packed again after a compaction
    assert all(later < earlier for earlier, later in zip(packs, packs[1:]))
    assert set(used) == set(packs)  # each packing served the matmuls of its row count
    assert step._packed == {}  # dropped with the batch
    for x, y in zip(a, b):
        assert x.response_ids == y.response_ids and x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    # rows leaving with fewer than PACK_MIN_TOKENS steps to go: no new packing
    packs.clear()
    packed.generate(prompts, 1, SamplingParams(0.0, max_new_tokens=PACK_MIN_TOKENS))
    assert packs == [len(prompts)]


@pytest.mark.skipif(not mkl_packing(), reason="this PyTorch has no MKL packed GEMM")
@pytest.mark.parametrize("arch", ["qwen2", "llama-biases"])
def test_packed_weights_decode_as_the_plain_step(tiny, prompts, arch):
    """CPU float32 weights packed for the batch (MKL) give the plain fused step's tokens and
    log-probs, also once rows have left the batch (plain matmuls again); the copies are dropped
    with the batch."""
    from hpt.rollout.decode import PACK_MIN_TOKENS

    model, tokenizer = tiny
    if arch != "qwen2":
        model = tiny_llama(tokenizer, attention_bias=True, mlp_bias=True)
    stop = common_token(model, tokenizer, prompts)
    # rows may stop from token 3 on: the batch is compacted while its packed weights are live
    options = dict(batch_size=8, stop_token_ids=[stop], min_new_tokens=3)
    packed, plain = HFEngine(model, tokenizer, **options), HFEngine(model, tokenizer, **options)
    plain.decoder.fused.pack = False
    step = packed.decoder.fused
    calls = []
    pack = step._pack
    step._pack = lambda rows: calls.append(rows) or pack(rows)
    sampling = SamplingParams(0.0, max_new_tokens=PACK_MIN_TOKENS)
    a, b = packed.generate(prompts, 1, sampling), plain.generate(prompts, 1, sampling)
    assert calls == [len(prompts)] and step._packed == {}  # packed for the batch, then dropped
    assert {r.finish_reason for r in b} == {"stop", "length"}  # rows left the batch early
    for x, y in zip(a, b):
        assert x.response_ids == y.response_ids and x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    sampled = SamplingParams(temperature=0.9, max_new_tokens=PACK_MIN_TOKENS, seed=2)
    x, y = packed.generate(prompts, 3, sampled), plain.generate(prompts, 3, sampled)
    assert [r.response_ids for r in x] == [r.response_ids for r in y]
    assert calls == [len(prompts), 8, 3 * len(prompts) - 8]  # batches of at most 8 rows
    # one step on the packed weights: the logits of the plain matmuls
    step.refresh(rows=2)
    assert len(step._packed) == 7 * len(step.layers) + 1  # every projection and the head
    token, position = torch.tensor([[5], [7]]), torch.tensor([[0], [0]])
    cache = packed.decoder.new_cache(4)[0]
    logits = step(token, torch.ones(2, 1, dtype=torch.long), position, cache)
    step.unpack()
    reference = step(
        token, torch.ones(2, 1, dtype=torch.long), position, plain.decoder.new_cache(4)[0]
    )
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)
    # short generations and bf16 copies are not packed
    calls.clear()
    packed.generate(prompts, 1, SamplingParams(0.0, max_new_tokens=PACK_MIN_TOKENS - 1))
    assert calls == []
    low = HFEngine(model, tokenizer, dtype="bfloat16").decoder.fused
    low.refresh(rows=4)
    assert low._packed == {}
    # pack_weights=False: plain matmuls for a batch that would be packed
    off = HFEngine(model, tokenizer, pack_weights=False, **options)
    off.decoder.fused._pack = lambda rows: calls.append(rows) or pack(rows)
    z = off.generate(prompts, 1, sampling)
    assert calls == [] and off.decoder.fused._packed == {}
    assert [r.response_ids for r in z] == [r.response_ids for r in b]
