"""Padding-free (packed) passes and token-sized micro-batches give the padded path's losses and
gradients."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types

import pytest
import torch

from hpt.algorithms import get_algorithm
from hpt.estimator.unified import KIND_ID
from hpt.train import prompt_attention
from hpt.train.batch import Row, collate, token_micro_batches
from hpt.train.config import TrainConfig
from hpt.train.policy import Policy
from hpt.train.setup import enable_checkpointing
from hpt.train.step import packs, plan_passes, prepare, shares_prompts, update

# a small random decoder for tests that build one from a config (grouped-query heads)
SMALL_LAYERS = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def make_rows(vocab: int, seed: int = 0) -> list[Row]:
    """Rollout and demonstration rows of uneven prompt and response lengths (two questions)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(7):
        prompt = torch.randint(
            5, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g
        )
        response = torch.randint(
            5, vocab, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g
        )
        kind = "sft" if i == 6 else "rollout"
        rows.append(
            Row(prompt.tolist(), response.tolist(), kind, i % 2, float(i % 3 == 0), 0.5 + 0.1 * i)
        )
    return rows


def settings(**optim) -> TrainConfig:
    (config,) = TrainConfig().resolved_stages()
    optim = {"grad_clip": float("inf"), "mini_batch_questions": 1, **optim}  # two updates
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, **optim))


def gradients_after_update(model, rows, pad_id, config, algorithm):
    """The loss and the parameters' gradients after :func:`hpt.train.step.update` (lr 0)."""
    model = copy.deepcopy(model)
    policy = Policy(model)
    batch = collate(rows, pad_id, KIND_ID)
    need_old = algorithm.needs_old_logprobs
    prepare(batch, policy, None, algorithm, config, need_old)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    metrics = update(batch, policy, optimizer, algorithm, config, need_old)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return metrics["loss"], grads, batch


def assert_same_update(loss, grads, loss_ref, grads_ref):
    """The same loss and the same gradient of every parameter (to float32 rounding)."""
    assert abs(loss - loss_ref) <= 1e-5 * max(1.0, abs(loss_ref))
    assert grads.keys() == grads_ref.keys() and grads_ref
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logprobs_equal_padded(tiny, attention):
    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    model.config._attn_implementation = attention
    rows = make_rows(model.config.vocab_size)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    policy = Policy(model)
    everything = torch.arange(len(batch))
    padded, packed = batch.select(everything), batch.pack(everything)
    assert packed.input_ids.shape == (1, int(batch.attention_mask.sum()))  # no padding at all
    with torch.no_grad():
        lp_pad, ent_pad, _ = policy(
            padded.input_ids, padded.attention_mask, padded.response_index, padded.labels
        )
        lp_pack, ent_pack, _ = policy(
            packed.input_ids,
            packed.attention_mask,
            packed.response_index,
            packed.labels,
            position_ids=packed.position_ids,
        )
        # an independent reference: each row alone, unpadded
        for i, row in enumerate(rows):
            ids = torch.tensor([row.prompt_ids + row.response_ids])
            logits = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1]
            alone = torch.log_softmax(logits.float(), -1)
            alone = alone.gather(1, torch.tensor(row.response_ids)[:, None]).squeeze(1)
            r = len(row.response_ids)
            torch.testing.assert_close(lp_pack[i, :r], alone, atol=1e-5, rtol=1e-5)
    mask = batch.response_mask
    torch.testing.assert_close(lp_pack[mask], lp_pad[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_pack[mask], ent_pad[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "optim",
    [
        {"packing": True, "micro_batch_size": 3},
        {"packing": True, "micro_batch_tokens": 40},
        {"packing": False, "micro_batch_tokens": 40},
        {"packing": True, "micro_batch_tokens": 1},  # every row alone, over budget
    ],
    ids=["packed-rows", "packed-tokens", "padded-tokens", "one-row-a-pass"],
)
@pytest.mark.parametrize("algorithm_name", ["hpt", "ppo"])
def test_update_gradients_equal_the_padded_path(tiny, optim, algorithm_name):
    model, tokenizer = tiny
    algorithm = get_algorithm(algorithm_name)
    rows = make_rows(model.config.vocab_size, seed=1)
    pad = tokenizer.pad_token_id
    # the padded, fixed-rows path as it was before packing: the reference
    loss_ref, grads_ref, _ = gradients_after_update(
        model,
        rows,
        pad,
        settings(packing=False, micro_batch_size=8, share_prompts=False),
        algorithm,
    )
    loss, grads, batch = gradients_after_update(model, rows, pad, settings(**optim), algorithm)
    if optim.get("micro_batch_tokens"):
        config = settings(**optim)
        passes = plan_passes(batch, torch.arange(len(batch)), config, packs(config))
        assert len(passes) > 1
    assert_same_update(loss, grads, loss_ref, grads_ref)


def test_auto_packs_only_with_a_varlen_attention_kernel(tiny):
    model, _ = tiny
    policy = Policy(model)
    auto, on, off = settings(packing="auto"), settings(packing=True), settings(packing=False)
    assert (packs(on, policy), packs(off, policy)) == (True, False)
    implementation = model.config._attn_implementation
    try:
        model.config._attn_implementation = "sdpa"
        assert not packs(auto, policy)  # one block-diagonal mask over all rows: slower than padding
        model.config._attn_implementation = "flash_attention_2"
        assert packs(auto, policy)
        wrapped = types.SimpleNamespace(module=policy)  # as DDP holds the policy
        assert packs(auto, wrapped)
    finally:
        model.config._attn_implementation = implementation


def test_packing_changes_gradients_when_rows_leak():
    """The equality above is not vacuous: one sequence without restarting positions (rows that
    attend to each other) gives different log-probs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, **SMALL_LAYERS)
    model = Qwen2ForCausalLM(config).eval()
    rows = make_rows(50, seed=2)
    batch = collate(rows, 0, KIND_ID)
    packed = batch.pack(torch.arange(len(batch)))
    policy = Policy(model)
    with torch.no_grad():
        right = policy(
            packed.input_ids,
            packed.attention_mask,
            packed.response_index,
            packed.labels,
            position_ids=packed.position_ids,
        )[0]
        one_sequence = torch.arange(packed.input_ids.shape[1])[None]  # positions never restart
        leaked = policy(
            packed.input_ids,
            packed.attention_mask,
            packed.response_index,
            packed.labels,
            position_ids=one_sequence,
        )[0]
    mask = batch.response_mask
    assert (right[mask] - leaked[mask]).abs().max() > 1e-3


def test_token_micro_batches_respect_the_budget():
    lengths = torch.tensor([5, 9, 3, 12, 7, 7, 2, 20])
    for packed in (True, False):
        passes = token_micro_batches(lengths, 16, packed)
        seen = torch.cat(passes).sort().values
        assert seen.tolist() == list(range(len(lengths)))  # every row exactly once
        for rows in passes:
            size = lengths[rows]
            cost = int(size.sum()) if packed else len(rows) * int(size.max())
            assert cost <= 16 or len(rows) == 1
    # first-fit decreasing: 20 alone (over budget), 12 with 3, 9 with 7, 7 with 5 and 2 ...
    assert [sorted(lengths[p].tolist()) for p in token_micro_batches(lengths, 16, True)] == [
        [20],
        [3, 12],
        [7, 9],
        [2, 5, 7],
    ]


def test_token_micro_batches_count_a_shared_prompt_once():
    """Passes that run each distinct prompt once cost its prompt once (at a multiple of 16
    tokens) plus rows x the longest response: a question's rows fit where whole rows would not."""
    # two questions of four rows: 20-token prompts, 10-token responses (30 a row)
    lengths, keys, prompt_lengths = torch.full((8,), 30), torch.arange(8) // 4, torch.full((8,), 20)
    whole = token_micro_batches(lengths, 150, False)
    assert [len(p) for p in whole] == [5, 3]  # 5 x 30 = 150
    shared = token_micro_batches(lengths, 150, False, (keys, prompt_lengths))
    assert [p.tolist() for p in shared] == [list(range(8))]  # 2 x 32 + 8 x 10 = 144
    by_question = token_micro_batches(lengths, 100, False, (keys, prompt_lengths))
    assert [p.tolist() for p in by_question] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 72 each, 114 both
    # ragged rows: every pass within budget at its real cost (or a row alone)
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 5, (40,), generator=g)
    prompt_lengths = keys * 7 + 5  # a question's rows share its prompt length
    lengths = prompt_lengths + torch.randint(1, 40, (40,), generator=g)
    passes = token_micro_batches(lengths, 200, False, (keys, prompt_lengths))
    assert torch.cat(passes).sort().values.tolist() == list(range(40))
    for rows in passes:
        width = -(-int(prompt_lengths[rows].max()) // 16) * 16
        responses = lengths[rows] - prompt_lengths[rows]
        cost = len(set(keys[rows].tolist())) * width + len(rows) * int(responses.max())
        assert cost <= 200 or len(rows) == 1


def test_token_micro_batches_count_the_tokens_of_unpadded_passes():
    """Where passes leave the responses' padding out (one call on a CPU), a pass costs its
    prompts plus its responses' total length (rounded up to 16): uneven rollouts fill passes
    that their longest response would have cut; rows with prompts of their own cost what the
    pass will run, split where that drops 1/8 of the padded tokens, padded otherwise."""
    # one question: a 10-token prompt and responses of 60, 5, 5 and 5 tokens
    lengths, keys, prompts = torch.tensor([70, 15, 15, 15]), torch.zeros(4), torch.full((4,), 10)
    by_longest = token_micro_batches(lengths, 128, False, (keys, prompts))
    assert [p.tolist() for p in by_longest] == [[0], [1, 2, 3]]  # 16 + 2 x 60 = 136 for two
    unpadded = token_micro_batches(lengths, 128, False, (keys, prompts), unpadded=True)
    assert [p.tolist() for p in unpadded] == [[0, 1, 2, 3]]  # 16 + (75 -> 80) = 96
    # every row its own prompt (10 tokens, width 16): split where that drops 1/8, else padded
    own = torch.arange(4)
    uneven = torch.tensor([68, 14, 14, 14])  # three rows: 48 + (66 -> 80) = 128, padded 204
    assert [p.tolist() for p in token_micro_batches(uneven, 130, False, (own, prompts), True)] == [
        [0, 1, 2],
        [3],
    ]
    even = torch.tensor([40, 40, 40, 40])  # four rows: 64 + 120 -> 128 is over 7/8 of 160
    passes = token_micro_batches(even, 150, False, (own, prompts), unpadded=True)
    assert [p.tolist() for p in passes] == [[0, 1, 2], [3]]  # padded: 3 x 40 = 120 fits
    # ragged rows: every pass within budget at the tokens it runs (or a row alone)
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 5, (40,), generator=g)
    prompt_lengths = keys * 7 + 5
    lengths = prompt_lengths + torch.randint(1, 40, (40,), generator=g)
    passes = token_micro_batches(lengths, 200, False, (keys, prompt_lengths), unpadded=True)
    assert torch.cat(passes).sort().values.tolist() == list(range(40))
    assert len(passes) < len(token_micro_batches(lengths, 200, False, (keys, prompt_lengths)))
    for rows in passes:
        width = -(-int(prompt_lengths[rows].max()) // 16) * 16
        responses = int((lengths[rows] - prompt_lengths[rows]).sum())
        groups = len(set(keys[rows].tolist()))
        split = groups * width + -(-responses // 16) * 16
        padded = len(rows) * int(lengths[rows].max())
        cost = split if groups < len(rows) or split <= 7 / 8 * padded else padded
        assert cost <= 200 or len(rows) == 1


def test_old_logprobs_from_the_engine_equal_a_recomputed_pass(tiny):
    """Several updates a step: pi_old of rollout tokens is the hf engine's sampling log-probs
    (no forward pass), and equals what the trainer's own pass would compute."""
    from hpt.rollout import HFEngine, SamplingParams
    from hpt.train.step import old_logprobs_from_engine

    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    engine = HFEngine(model, tokenizer)
    prompts = [tokenizer.encode("1+2="), tokenizer.encode("7+5=")]
    rollouts = engine.generate(
        prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    )
    rows = [
        Row(r.prompt_ids, r.response_ids, "rollout", r.prompt_index, 1.0, 1.0, r.logprobs)
        for r in rollouts
    ] + [Row(prompts[0], tokenizer.encode(" 3"), "sft", 0, 1.0, 1.0)]
    algorithm = get_algorithm("hpt")
    config = settings(packing=True)
    assert old_logprobs_from_engine(config, engine, algorithm)
    policy = Policy(model)
    from_engine = collate(rows, tokenizer.pad_token_id, KIND_ID)
    metrics = prepare(from_engine, policy, None, algorithm, config, True, old_from_engine=True)
    assert metrics["passes/forward"] == 0  # no pass was run for pi_old
    recomputed = collate(rows, tokenizer.pad_token_id, KIND_ID)
    metrics = prepare(recomputed, policy, None, algorithm, config, True)
    assert metrics["passes/forward"] == 1 and metrics["rollout/logprob_gap"] < 1e-5
    rollout_tokens = recomputed.response_mask & (recomputed.kinds == KIND_ID["rollout"])[:, None]
    torch.testing.assert_close(
        from_engine.extras["old_logprobs"][rollout_tokens],
        recomputed.extras["old_logprobs"][rollout_tokens],
        atol=1e-5,
        rtol=1e-5,
    )
    # where the engine's numbers are not the trainer's, auto recomputes; engine is still allowed
    nucleus = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, top_p=0.9))
    assert not old_logprobs_from_engine(nucleus, engine, algorithm)
    forced = dataclasses.replace(
        nucleus, rollout=dataclasses.replace(nucleus.rollout, old_logprobs="engine")
    )
    assert old_logprobs_from_engine(forced, engine, algorithm)


def test_engine_old_logprobs_refused_when_demonstrations_need_them():
    from hpt.errors import ConfigError
    from hpt.train.step import old_logprobs_from_engine

    algorithm = get_algorithm("hpt")
    sft_with_ratio = dataclasses.replace(algorithm.terms[0], reference="old")
    custom = dataclasses.replace(algorithm, terms=(sft_with_ratio, *algorithm.terms[1:]))
    config = settings()
    config = dataclasses.replace(
        config, rollout=dataclasses.replace(config.rollout, old_logprobs="engine")
    )
    with pytest.raises(ConfigError, match="sft"):
        old_logprobs_from_engine(config, object(), custom)
    auto = dataclasses.replace(
        config, rollout=dataclasses.replace(config.rollout, old_logprobs="auto")
    )
    assert not old_logprobs_from_engine(auto, object(), custom)


# --- shared prompts: each distinct prompt runs once, the responses on its KV cache ---------------


def rounded_up(tokens: int, grid: int, multiple: int = 16) -> int:
    """How many positions of a ``grid``-position pass run for ``tokens`` real ones (on a CPU):
    those, and padding up to a multiple of 16, or the whole grid where that is no more."""
    return min(-(-tokens // multiple) * multiple, grid)


def test_real_positions_round_up_with_the_first_padding():
    from hpt.train.batch import real_positions

    mask = torch.zeros(4, 25, dtype=torch.bool)
    mask[0, :20], mask[1, :3], mask[2, :14] = True, True, True  # 37 tokens of 100
    where = real_positions(mask)
    assert where.numel() == 48 and torch.equal(where, where.sort().values)
    assert mask.reshape(-1)[where].sum() == 37  # every token, and 11 padding positions:
    padding = (~mask).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(where[~mask.reshape(-1)[where]], padding[:11])  # the first ones
    mask[3, :] = mask[2, :] = True  # 73 tokens: 80 positions, not yet the whole grid
    assert real_positions(mask).numel() == 80
    mask[1, :] = True  # 95 tokens: 96 positions
    assert real_positions(mask).numel() == 96
    mask[0, 20:22] = True  # 97 tokens: 112 would be more than the grid, so the whole grid
    assert real_positions(mask) is None
    assert real_positions(torch.ones(3, 5, dtype=torch.bool)) is None


def make_shared_rows(vocab: int, seed: int = 0, longest: int = 15) -> list[Row]:
    """Three questions (prompts of 4, 9 and 13 tokens), each with rollouts and a demonstration of
    uneven response lengths (one of a single token), plus one question with a single row."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    rows = []
    for q, p in enumerate((9, 4, 13)):
        prompt = tokens(p)
        for j in range(4):
            n = 1 if (q, j) == (1, 2) else int(torch.randint(2, longest + 1, (1,), generator=g))
            kind = "sft" if j == 3 else "rollout"
            rows.append(Row(prompt, tokens(n), kind, q, float(j % 2), 0.5 + 0.1 * j))
    rows.append(Row(tokens(6), tokens(5), "rollout", 3, 1.0))
    return rows


@pytest.fixture(params=["one-call", "two-calls"])
def prompt_calls(request, monkeypatch):
    """Shared-prompt passes as one decoder call (:mod:`hpt.train.prompt_attention`, where the
    model's attention allows it) or as two, the prompts' KV cache then the responses (elsewhere):
    the decoder calls a shared pass makes."""
    if request.param == "two-calls":
        monkeypatch.setattr(prompt_attention, "applies", lambda model: False)
        return 2
    return 1


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_logprobs_equal_each_row_alone(tiny, attention, prompt_calls):
    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    model.config._attn_implementation = attention
    rows = make_shared_rows(model.config.vocab_size)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    policy = Policy(model, value_head=True, temperature=0.7)
    torch.nn.init.normal_(policy.value_head.weight)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        lp_pad, ent_pad, v_pad = policy(*args)
        assert len(calls) == 1
        lp, ent, v = policy(*args, share_prompts=True)
        assert len(calls) == 1 + prompt_calls
        assert model.config._attn_implementation == attention  # put back after the pass
    hook.remove()
    with torch.no_grad():
        for i, row in enumerate(rows):  # an independent reference: each row alone, unpadded
            ids = torch.tensor([row.prompt_ids + row.response_ids])
            logits = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1] / 0.7
            alone = torch.log_softmax(logits.float(), -1)
            alone = alone.gather(1, torch.tensor(row.response_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(lp[i, : len(row.response_ids)], alone, atol=1e-5, rtol=1e-5)
    mask = batch.response_mask
    for shared, padded in ((lp, lp_pad), (ent, ent_pad), (v, v_pad)):
        torch.testing.assert_close(shared[mask], padded[mask], atol=1e-5, rtol=1e-4)


def test_share_prompts_splits_rows_by_prompt():
    from hpt.train.batch import share_prompts

    rows = make_shared_rows(50)
    batch = collate(rows, 0, KIND_ID)
    shared = share_prompts(batch.input_ids, batch.attention_mask, batch.response_index)
    assert shared.prompt_of_row.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    assert shared.prompt_mask.sum(1).tolist() == [9, 4, 13, 6]
    assert shared.prompt_ids.shape[1] == 16  # the longest, 13, padded to a multiple of 16
    for i, row in enumerate(rows):
        g, r = int(shared.prompt_of_row[i]), len(row.response_ids)
        assert shared.prompt_ids[g, : len(row.prompt_ids)].tolist() == row.prompt_ids
        assert shared.response_ids[i, :r].tolist() == row.response_ids
        assert shared.response_mask[i].sum() == r
    alone = collate(rows[-1:] + rows[:1], 0, KIND_ID)  # two rows, two prompts: nothing to share
    assert share_prompts(alone.input_ids, alone.attention_mask, alone.response_index) is None


def test_one_sequence_leaves_the_response_padding_out(tiny):
    """On a CPU the one shared-prompt sequence holds the prompts and the response tokens only;
    the layout puts them back on the rows x steps grid, zeros at the padding."""
    from hpt.train.batch import share_prompts

    model, tokenizer = tiny
    rows = make_shared_rows(model.config.vocab_size)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    shared = share_prompts(batch.input_ids, batch.attention_mask, batch.response_index)
    steps = batch.labels.shape[1] - 1
    input_ids, positions, layout = prompt_attention.one_sequence(shared, steps)
    running = shared.response_mask[:, :steps].bool()
    assert not running.all()
    groups, width = shared.prompt_ids.shape
    # the response tokens, and the first padding positions up to a multiple of 16
    tokens = rounded_up(int(running.sum()), running.numel())
    assert input_ids.shape == positions.shape == (1, groups * width + tokens)
    on_grid = layout.to_grid(input_ids[0, groups * width :]).view(len(rows), steps)
    assert torch.equal(on_grid[running], shared.response_ids[:, :steps][running])
    assert (on_grid[~running] == 0).all()
    for i, row in enumerate(rows):  # each response token after its own prompt
        r = min(len(row.response_ids), steps)
        expected = torch.arange(len(row.prompt_ids), len(row.prompt_ids) + r)
        grid_positions = layout.to_grid(positions[0, groups * width :]).view(len(rows), steps)
        assert torch.equal(grid_positions[i, :r], expected)
    # no padding (every response as long as the pass): the whole grid, as before
    full = dataclasses.replace(shared, response_mask=torch.ones_like(shared.response_mask))
    input_ids, _, layout = prompt_attention.one_sequence(full, steps)
    assert layout.real is None and input_ids.shape[1] == groups * width + len(rows) * steps


def test_shared_prompts_with_one_token_responses(tiny, prompt_calls):
    model, tokenizer = tiny
    rows = [r for r in make_shared_rows(model.config.vocab_size) if r.group == 1]
    rows = [dataclasses.replace(r, response_ids=r.response_ids[:1]) for r in rows]
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    policy = Policy(model)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    with torch.no_grad():
        torch.testing.assert_close(policy(*args, share_prompts=True)[0], policy(*args)[0])


@pytest.mark.parametrize(
    "passes",
    [
        {"micro_batch_size": 16},
        {"micro_batch_size": 3},
        {"micro_batch_tokens": 60},
        # one update over all four questions: the gradients compared are those of every row (with
        # one question a mini-batch, only the last mini-batch's, whose question has one row)
        {"micro_batch_size": 3, "mini_batch_questions": 4},
        {"micro_batch_tokens": 60, "mini_batch_questions": 4},
        {"micro_batch_size": 16, "mini_batch_questions": 4},
    ],
    ids=[
        "one-pass",
        "rows-split-a-question",
        "by-tokens",
        "one-update-rows",
        "one-update-tokens",
        "one-update-one-pass",
    ],
)
@pytest.mark.parametrize("algorithm_name", ["hpt", "ppo"])
def test_shared_prompt_update_gradients_equal_the_padded_path(
    tiny, passes, algorithm_name, prompt_calls
):
    """Each distinct prompt of a pass run once: the loss and every gradient of the update equal
    those of running every row whole."""
    model, tokenizer = tiny
    algorithm = get_algorithm(algorithm_name)
    rows = make_shared_rows(model.config.vocab_size, seed=2)
    pad = tokenizer.pad_token_id
    off = settings(**passes, share_prompts=False)
    on = settings(**passes, share_prompts=True)
    loss_ref, grads_ref, _ = gradients_after_update(model, rows, pad, off, algorithm)
    loss, grads, _ = gradients_after_update(model, rows, pad, on, algorithm)
    assert_same_update(loss, grads, loss_ref, grads_ref)


def test_auto_shares_prompts_only_where_it_applies(tiny, monkeypatch):
    from hpt.train.step import AUTO_SHARE_MIN_SAVED

    model, _ = tiny
    policy = Policy(model)
    auto = settings(share_prompts="auto")
    assert shares_prompts(auto, policy, packed=False)
    assert shares_prompts(auto, types.SimpleNamespace(module=policy), packed=False)  # DDP
    assert not shares_prompts(auto, policy, packed=True)
    assert not shares_prompts(settings(share_prompts=False), policy, packed=False)
    checkpointing = dataclasses.replace(
        auto, model=dataclasses.replace(auto.model, gradient_checkpointing=True)
    )
    assert not shares_prompts(checkpointing, policy, packed=False)
    fsdp = dataclasses.replace(
        auto, distributed=dataclasses.replace(auto.distributed, strategy="fsdp2")
    )
    # FSDP2 runs each layer's forward once a pass: shared in one call, never in two
    assert shares_prompts(fsdp, policy, packed=False) == 1
    monkeypatch.setattr(prompt_attention, "applies", lambda model: False)
    assert not shares_prompts(fsdp, policy, packed=False)
    assert shares_prompts(auto, policy, packed=False) == AUTO_SHARE_MIN_SAVED  # ddp: two calls


def test_auto_shares_prompts_on_the_cpu_only(tiny):
    """Off the CPU the second decoder call's kernel launches cost more than its FLOPs save."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    with torch.device("meta"):  # a model off the CPU, without a GPU
        elsewhere = Policy(AutoModelForCausalLM.from_config(model.config))
    assert not shares_prompts(settings(share_prompts="auto"), elsewhere, packed=False)
    assert shares_prompts(settings(share_prompts=True), elsewhere, packed=False) == 1
    assert shares_prompts(settings(share_prompts="auto"), Policy(model), packed=False)


@pytest.mark.slow
def test_compiled_layers_give_the_eager_gradients(tiny):
    """optim.compile: the training passes' compiled layers (shared prompts in one decoder call
    through them) compute what the eager unshared ones do, and the engine's forward outside them
    stays eager."""
    model, tokenizer = tiny
    algorithm = get_algorithm("grpo")
    rows = make_shared_rows(model.config.vocab_size, seed=3)
    pad = tokenizer.pad_token_id
    # every row backward: one pass a question (rows with advantage 0 would get passes of their own)
    unshared = settings(share_prompts=False, zero_gradient_rows="backward")
    shared = settings(share_prompts=True, zero_gradient_rows="backward")
    loss_ref, grads_ref, _ = gradients_after_update(model, rows, pad, unshared, algorithm)
    compiled = copy.deepcopy(model)
    policy = Policy(compiled, compile=True)
    batch = collate(rows, pad, KIND_ID)
    prepare(batch, policy, None, algorithm, shared, False)
    calls = []
    compiled.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    metrics = update(
        batch, policy, torch.optim.SGD(policy.parameters(), lr=0.0), algorithm, shared, False
    )
    # one mini-batch a question, one pass each, one decoder call a pass (two if shared in two)
    assert len(calls) == len({row.group for row in rows})
    assert abs(metrics["loss"] - loss_ref) <= 1e-5 * max(1.0, abs(loss_ref))
    for name, p in policy.named_parameters():
        if name in grads_ref:
            torch.testing.assert_close(p.grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    assert policy._compiled and all(
        "forward" not in layer.__dict__ for layer in compiled.model.layers
    )


def test_autocast_runs_the_passes_in_bf16_with_float32_outputs_and_gradients(tiny):
    """optim.autocast=bfloat16: the decoder's matmuls run in bf16, the log-probs, entropy and
    every gradient stay float32 and near the float32 path's; pi_old is then recomputed."""
    from hpt.rollout import HFEngine
    from hpt.train.policy import autocast_dtype
    from hpt.train.step import old_logprobs_from_engine

    model, tokenizer = tiny
    algorithm = get_algorithm("hpt")
    rows = make_shared_rows(model.config.vocab_size, seed=5)
    pad = tokenizer.pad_token_id
    loss_ref, grads_ref, _ = gradients_after_update(model, rows, pad, settings(), algorithm)

    mixed = copy.deepcopy(model)
    seen = []
    mixed.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    policy = Policy(mixed, autocast=torch.bfloat16)
    batch = collate(rows, pad, KIND_ID)
    lp, ent, _ = policy(batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    assert seen == [torch.bfloat16] and lp.dtype == ent.dtype == torch.float32
    prepare(batch, policy, None, algorithm, settings(), True)
    metrics = update(
        batch, policy, torch.optim.SGD(policy.parameters(), lr=0.0), algorithm, settings(), True
    )
    assert abs(metrics["loss"] - loss_ref) <= 2e-2 * max(1.0, abs(loss_ref))
    for name, p in policy.named_parameters():
        if name in grads_ref:
            assert p.grad.dtype == torch.float32, name
            cosine = torch.nn.functional.cosine_similarity(
                p.grad.flatten(), grads_ref[name].flatten(), dim=0
            )
            assert cosine > 0.98, (name, float(cosine))

    assert autocast_dtype("bfloat16", model) == torch.bfloat16
    assert autocast_dtype("auto", model) is None  # CPU: off
    assert autocast_dtype(False, model) is None
    assert autocast_dtype(True, model) == torch.bfloat16
    assert autocast_dtype("bfloat16", model, "fsdp2") is None  # fsdp2's mixed_precision instead
    engine = HFEngine(model, tokenizer)
    assert old_logprobs_from_engine(settings(), engine, algorithm)
    assert not old_logprobs_from_engine(settings(), engine, algorithm, torch.bfloat16)


@pytest.mark.parametrize(
    "share, calls_a_layer, autocast",
    [(1, 2, True), (0, 1, True), (1, 2, False), (0, 1, False)],
    # the one-call shared pass (prompts, responses); padded rows (sdpa); under autocast, or with
    # bf16 weights
    ids=["one-call-autocast", "padded-autocast", "one-call-bf16", "padded-bf16"],
)
def test_attention_runs_in_float32_on_a_cpu(tiny, monkeypatch, share, calls_a_layer, autocast):
    """CPU flash attention's bf16 backward is slow: under autocast, or with bf16 weights, a pass
    hands its attention float32 queries, keys and values (autocast off there): the one-call
    shared pass through its own attention, padded rows through transformers' sdpa swapped for
    ``FLOAT32_SDPA``; the gradients are those of the bf16 attention, to bf16 rounding."""
    model, tokenizer = tiny
    if not autocast:
        model = copy.deepcopy(model).to(torch.bfloat16)
    rows = make_shared_rows(model.config.vocab_size, seed=5)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    sdpa, float32_attention = (
        prompt_attention.F.scaled_dot_product_attention,
        prompt_attention.float32_attention,
    )
    seen: list[torch.dtype] = []

    def recording(query, key, value, *rest, **kwargs):
        out = sdpa(query, key, value, *rest, **kwargs)
        seen.append(out.dtype)  # what ran, after autocast's casts
        return out

    monkeypatch.setattr(prompt_attention.F, "scaled_dot_product_attention", recording)
    grads = {}
    for upcast in (True, False):
        if not upcast:
            monkeypatch.setattr(prompt_attention, "float32_attention", lambda query: False)
            monkeypatch.setattr(
                prompt_attention, "float32_sdpa", lambda *_: contextlib.nullcontext()
            )
        copy_ = copy.deepcopy(model)
        seen.clear()
        policy = Policy(copy_, autocast=torch.bfloat16 if autocast else None)
        lp, _, _ = policy(*args, share_prompts=share)
        (lp * batch.response_mask).sum().backward()
        layers = model.config.num_hidden_layers
        assert seen == [torch.float32 if upcast else torch.bfloat16] * calls_a_layer * layers
        grads[upcast] = {n: p.grad for n, p in copy_.named_parameters() if p.grad is not None}
    assert copy_.config._attn_implementation == "sdpa"  # put back
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[True].items():  # the same gradients, to bf16 rounding
        cosine = torch.nn.functional.cosine_similarity(
            g.float().flatten(), grads[False][name].float().flatten(), dim=0
        )
        assert cosine > 0.98, (name, float(cosine))
    query = torch.zeros(1, 2, 3, 4)
    assert not float32_attention(query)
    assert float32_attention(query.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float32_attention(query)


@pytest.mark.parametrize("layout", ["padded", "packed", "two-calls"])
def test_float32_sdpa_attends_under_the_masks_of_sdpa(tiny, monkeypatch, layout):
    """The float32 attention swapped in for transformers' sdpa on a CPU gets the masks sdpa gets:
    right padding, packed sequences (block-diagonal) and a two-call shared pass's padded prompt
    cache. Under autocast each row's log-probs are those of the row alone (to bf16 rounding);
    without the masks a packed row would attend to the rows before it."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    if layout == "two-calls":
        monkeypatch.setattr(prompt_attention, "applies", lambda model: False)
    rows = make_shared_rows(model.config.vocab_size)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    everything = torch.arange(len(batch))
    micro = batch.pack(everything) if layout == "packed" else batch.select(everything)
    policy = Policy(model, autocast=torch.bfloat16)
    ran: list[torch.dtype] = []
    monkeypatch.setattr(
        prompt_attention,
        "float32_attention",
        lambda query, rule=prompt_attention.float32_attention: (
            ran.append(query.dtype) or rule(query)
        ),
    )
    with torch.no_grad():
        lp, _, _ = policy(
            micro.input_ids,
            micro.attention_mask,
            micro.response_index,
            micro.labels,
            position_ids=micro.position_ids if layout == "packed" else None,
            share_prompts=layout == "two-calls",
        )
        assert ran and model.config._attn_implementation == "sdpa"  # swapped in, and back
        for i, row in enumerate(rows):  # each row alone, under the same autocast
            ids = torch.tensor([row.prompt_ids + row.response_ids])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1]
            alone = torch.log_softmax(logits.float(), -1)
            alone = alone.gather(1, torch.tensor(row.response_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(lp[i, : len(row.response_ids)], alone, atol=3e-2, rtol=0)


def test_autocast_with_gradient_checkpointing_recomputes_in_bf16(tiny, monkeypatch):
    """Activation checkpointing under optim.autocast: the recomputed forward runs under the same
    autocast, so the gradients are those of the pass without checkpointing (whose attention
    stays in bf16 here too: a checkpointed pass keeps transformers' sdpa, since the recomputation
    runs after a swap would be undone)."""
    monkeypatch.setattr(prompt_attention, "float32_sdpa", lambda *_: contextlib.nullcontext())
    model, tokenizer = tiny
    rows = make_shared_rows(model.config.vocab_size, seed=7)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    grads = []
    for checkpointing in (False, True):
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            enable_checkpointing(copy_, {"use_reentrant": False})
        lp, ent, _ = Policy(copy_, autocast=torch.bfloat16)(*args)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads.append({n: p.grad for n, p in copy_.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-3, msg=name)
    monkeypatch.undo()  # the trainer's own choice: no swap where backward recomputes
    lp, ent, _ = Policy(copy_, autocast=torch.bfloat16)(*args)
    (lp.sum() + 0.1 * ent.sum()).backward()  # recomputed as it ran (a swap would fail here)


def test_prompts_are_shared_only_when_that_saves_enough_tokens(tiny, monkeypatch):
    """share_prompts as a threshold: below it the pass runs every row whole (same numbers)."""
    from hpt.train.batch import share_prompts
    from hpt.train.step import AUTO_SHARE_MIN_SAVED, AUTO_SHARE_MIN_SAVED_ONE_CALL

    model, tokenizer = tiny
    rows = make_shared_rows(model.config.vocab_size, seed=3)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index)
    lengths = (batch.response_index[:, 0] + 1).tolist()
    prompts = {tuple(row[:n]) for row, n in zip(batch.input_ids.tolist(), lengths)}
    assert sorted(len(p) for p in prompts) == [4, 6, 9, 13]  # make_shared_rows' four prompts
    saved = sum(lengths) - sum(len(p) for p in prompts)
    assert share_prompts(*args, min_saved=saved) is not None
    assert share_prompts(*args, min_saved=saved + 1) is None
    policy = Policy(model)
    mask = batch.response_mask
    full = policy(*args, batch.labels)[0][mask]
    for threshold in (saved, saved + 1):
        shared = policy(*args, batch.labels, share_prompts=threshold)[0][mask]
        torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    auto = settings(share_prompts="auto")
    assert shares_prompts(settings(share_prompts=True), policy, False) == 1
    # one decoder call a shared pass (the tiny Qwen2): auto shares wherever a prompt repeats
    assert AUTO_SHARE_MIN_SAVED_ONE_CALL == shares_prompts(auto, policy, False) == 1
    compiled = dataclasses.replace(auto, optim=dataclasses.replace(auto.optim, compile=True))
    assert shares_prompts(compiled, policy, False) == 1  # compiled layers take one call too
    monkeypatch.setattr(prompt_attention, "applies", lambda model: False)  # two calls
    assert AUTO_SHARE_MIN_SAVED == shares_prompts(auto, policy, False) > 1


def test_one_call_shared_prompts_apply_to_full_attention_llama_families():
    """One decoder call for a shared pass where every layer's attention is full causal attention
    through transformers' attention interface, reading the model's config; two calls for
    windows, other architectures, and attention layers with a config of their own."""
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    def model_of(config):
        return AutoModelForCausalLM.from_config(config)

    small = {**SMALL_LAYERS, "vocab_size": 64}
    assert prompt_attention.applies(model_of(LlamaConfig(**small)))
    assert prompt_attention.applies(model_of(Qwen2Config(**small)))
    assert prompt_attention.applies(model_of(Qwen3Config(**small)))
    assert prompt_attention.applies(model_of(MistralConfig(sliding_window=None, **small)))
    assert not prompt_attention.applies(model_of(MistralConfig(sliding_window=8, **small)))
    windowed = Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **small)
    assert not prompt_attention.applies(model_of(windowed))
    gpt2 = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64)
    assert not prompt_attention.applies(model_of(gpt2))
    assert not prompt_attention.applies(types.SimpleNamespace())  # no config at all
    own = model_of(LlamaConfig(**small))
    own.model.layers[1].self_attn.config = copy.deepcopy(own.config)  # would not see the swap
    assert not prompt_attention.applies(own)


def test_one_call_shared_prompts_through_lora_adapters(tiny):
    """A PEFT-wrapped model takes the one-call path too (its base model's attention is swapped),
    with the adapters on and, for the reference policy, off: the unshared pass's numbers."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    rows = make_shared_rows(model.config.vocab_size, seed=4)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    mask = batch.response_mask
    calls = []
    peft_model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    adapted = []
    for adapter_disabled in (False, True):
        policy = Policy(peft_model, adapter_disabled=adapter_disabled)
        with torch.no_grad():
            full = policy(*args)[0]
            before = len(calls)
            shared = policy(*args, share_prompts=True)[0]
        assert len(calls) == before + 1  # one decoder call
        torch.testing.assert_close(shared[mask], full[mask], atol=1e-5, rtol=1e-5)
        adapted.append(shared[mask])
    assert not torch.allclose(adapted[0], adapted[1])  # the adapters changed something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_call_shared_prompts_on_cuda(tiny):
    """On a GPU (benchmarks/gpu_check.sh): the one-call shared pass gives the unshared pass's
    log-probs and gradients (float32; SDPA with a boolean mask and grouped-query heads)."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).cuda()
    rows = make_shared_rows(model.config.vocab_size, seed=5)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = [t.cuda() for t in (batch.input_ids, batch.attention_mask, batch.response_index)]
    labels, mask = batch.labels.cuda(), batch.response_mask.cuda()
    policy = Policy(model)
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logprobs = policy(*args, labels, share_prompts=share)[0]
        (logprobs * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logprobs[mask].detach(), grads))
    (full, full_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    assert shared_grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(shared_grads[name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_checkpointing_is_enabled_under_either_transformers_name(tiny):
    """transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable:
    enable_checkpointing calls the name the model has, with the same keyword arguments."""
    model, _ = tiny
    model = copy.deepcopy(model)
    enable_checkpointing(model, {"use_reentrant": False})
    assert model.model.gradient_checkpointing
    calls = []
    older = types.SimpleNamespace(gradient_checkpointing_enable=lambda **kw: calls.append(kw))
    enable_checkpointing(older, {"use_reentrant": False})
    assert calls == [{"gradient_checkpointing_kwargs": {"use_reentrant": False}}]


def test_gradient_checkpointing_runs_rows_whole(tiny):
    """Checkpointed layers recompute in backward without the shared pass's prompt cache or
    swapped attention: a pass asked to share runs every row whole instead (it raised before)."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).train()
    enable_checkpointing(model, {"use_reentrant": False})
    rows = make_shared_rows(model.config.vocab_size, seed=6)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    policy, mask = Policy(model), batch.response_mask
    inputs = []
    model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: inputs.append(kwargs["input_ids"]), with_kwargs=True
    )
    grads = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        (policy(*args, share_prompts=share)[0] * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert [x.shape for x in inputs] == [batch.input_ids.shape] * 2  # every row whole, twice
    for shared, whole in zip(*grads):
        torch.testing.assert_close(shared, whole)
    with torch.no_grad():  # no backward, nothing recomputed: shared in one call
        policy(*args, share_prompts=True)
    assert inputs[-1].shape[0] == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_one_call_shared_prompts_for_each_family(family):
    """Each family the one-call path applies to (a small random model of its own architecture,
    grouped-query heads): one decoder call, and the unshared pass's log-probs and gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    small = {**SMALL_LAYERS, "vocab_size": 97, "head_dim": 8}
    extra = {"mistral": {"sliding_window": None}}.get(family, {})
    config = AutoConfig.for_model(family, **small, **extra)
    model = AutoModelForCausalLM.from_config(config).float().train()
    assert prompt_attention.applies(model)
    rows = make_shared_rows(97, seed=7)
    batch = collate(rows, 0, KIND_ID)
    args = (batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    policy, mask = Policy(model), batch.response_mask
    calls = []
    model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logprobs = policy(*args, share_prompts=share)[0]
        (logprobs * mask).sum().backward()
        results.append((logprobs[mask].detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 2  # the unshared pass, then the shared one: one call each
    (whole, whole_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    for s, w in zip(shared_grads, whole_grads):
        torch.testing.assert_close(s, w, atol=1e-5, rtol=1e-4)


def spy(function, calls):
    """``function``, recording each call's arguments in ``calls``."""

    def recorded(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return recorded


@pytest.mark.parametrize("path", ["padded", "packed", "shared"])
def test_head_runs_on_the_real_tokens_only(tiny, monkeypatch, path):
    """Given the response mask, the output head computes the real tokens only: their log-probs,
    entropies and the gradients of a masked loss are those of the whole head, padding gets 0."""
    from hpt.train import policy as policy_module

    model, tokenizer = tiny
    make = make_shared_rows if path == "shared" else make_rows  # shared: prompts repeat
    rows = make(model.config.vocab_size, seed=3)
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    everything = torch.arange(len(batch))
    micro = batch.pack(everything) if path == "packed" else batch.select(everything)
    mask = micro.response_mask
    assert not mask.all()  # responses of uneven lengths: padding to skip
    if path == "shared":  # the pass does share its prompts
        shares = []
        monkeypatch.setattr(
            Policy, "_shared_prompt_hidden", spy(Policy._shared_prompt_hidden, shares)
        )
    heads = []  # the tokens each head call computed
    original = policy_module.token_logprobs_and_entropy

    def counted(hidden, *args, **kwargs):
        heads.append(hidden.shape[0] * hidden.shape[1])
        return original(hidden, *args, **kwargs)

    monkeypatch.setattr(policy_module, "token_logprobs_and_entropy", counted)

    def run(response_mask):
        policy = Policy(copy.deepcopy(model))
        logprobs, entropy, _ = policy(
            micro.input_ids,
            micro.attention_mask,
            micro.response_index,
            micro.labels,
            position_ids=micro.position_ids,
            share_prompts=True if path == "shared" else 0,
            response_mask=response_mask,
        )
        (logprobs[mask].sum() + 0.1 * entropy[mask].sum()).backward()
        grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
        return logprobs.detach(), entropy.detach(), grads

    whole = run(None)
    assert heads == [mask.numel()]
    if path == "shared":
        assert shares
    real = run(mask)
    assert heads[1:] == [rounded_up(int(mask.sum()), mask.numel())]
    torch.testing.assert_close(real[0][mask], whole[0][mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(real[1][mask], whole[1][mask], atol=1e-6, rtol=1e-5)
    assert (real[0][~mask] == 0).all() and (real[1][~mask] == 0).all()
    assert real[2].keys() == whole[2].keys() and whole[2]
    for name, grad in whole[2].items():
        torch.testing.assert_close(real[2][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # no padding: the head runs as before, on every position
    full = torch.ones_like(mask)
    heads.clear()
    run(full)
    assert heads == [mask.numel()]


def own_prompt_rows(vocab: int, response_lengths: list[int], seed: int = 0) -> list[Row]:
    """One row per question (prompts of 5-8 tokens, none repeated), responses as long as given."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q, n in enumerate(response_lengths):
        prompt = torch.randint(5, vocab, (5 + q % 4,), generator=g).tolist()
        response = torch.randint(5, vocab, (n,), generator=g).tolist()
        rows.append(Row(prompt, response, "sft", q, 1.0))
    return rows


def test_rows_with_their_own_prompts_split_where_that_drops_the_padding():
    """unpad_at: rows whose prompts are all their own still split into prompts and responses
    when the responses' padding is at least that share of the padded tokens, and only then."""
    from hpt.train.batch import UNPAD_AT, share_prompts

    uneven = collate(own_prompt_rows(50, [2, 40, 3, 38]), 0, KIND_ID)
    args = (uneven.input_ids, uneven.attention_mask, uneven.response_index)
    assert share_prompts(*args) is None  # nothing repeats: no split without unpad_at
    split = share_prompts(*args, unpad_at=UNPAD_AT)
    assert split is not None
    assert split.prompt_of_row.tolist() == [0, 1, 2, 3]  # each row its own prompt
    assert split.response_mask.sum(1).tolist() == [2, 40, 3, 38]
    # prompts at width 16 and 83 response tokens: 147 of the 4 x 46 padded tokens
    assert split.prompt_ids.shape == (4, 16) and uneven.input_ids.numel() == 4 * 46
    assert share_prompts(*args, unpad_at=1 - 147.5 / 184) is not None
    assert share_prompts(*args, unpad_at=1 - 146.5 / 184) is None
    even = collate(own_prompt_rows(50, [38, 40, 39, 40]), 0, KIND_ID)
    args = (even.input_ids, even.attention_mask, even.response_index)
    assert share_prompts(*args, unpad_at=UNPAD_AT) is None  # little padding to drop


def test_rows_with_their_own_prompts_skip_the_padding_with_the_padded_gradients(tiny):
    """On a CPU a pass whose rows have their own prompts and uneven responses runs as one
    sequence without the responses' padding: the padded pass's log-probs and gradients."""
    model, tokenizer = tiny
    rows = own_prompt_rows(model.config.vocab_size, [2, 60, 3, 58, 2, 61])
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    mask = batch.response_mask
    sequences = []  # the tokens each decoder call ran

    def run(share):
        policy = Policy(copy.deepcopy(model))
        hook = policy.model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs: sequences.append(kwargs["input_ids"].numel()),
            with_kwargs=True,
        )
        logprobs, entropy, _ = policy(
            batch.input_ids,
            batch.attention_mask,
            batch.response_index,
            batch.labels,
            share_prompts=share,
            response_mask=mask,
        )
        hook.remove()
        (logprobs[mask].sum() + 0.1 * entropy[mask].sum()).backward()
        return logprobs.detach(), {n: p.grad for n, p in policy.named_parameters()}

    padded = run(0)
    unpadded = run(1)
    assert sequences[0] == batch.input_ids.numel()
    # one call: each prompt at the padded width 16, then the response tokens (none at the last
    # step, which predicts nothing)
    assert sequences[1:] == [len(rows) * 16 + rounded_up(int(mask[:, :-1].sum()), 6 * 60)]
    assert sequences[1] < 0.75 * sequences[0]
    torch.testing.assert_close(unpadded[0][mask], padded[0][mask], atol=1e-5, rtol=1e-5)
    for name, grad in padded[1].items():
        torch.testing.assert_close(unpadded[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "forward, expected",
    [
        ({"forward_micro_batch_size": 3}, 2),  # the training's 3 rows a pass: 3 + 3
        ({"forward_micro_batch_tokens": 1}, 6),  # token budgets for forward passes only
        ({"micro_batch_tokens": 1, "forward_micro_batch_tokens": 0}, 1),  # back to rows: 4 x 3
        ({"micro_batch_tokens": 1}, 6),  # 4 x 1 token: a row a pass
    ],
    ids=["rows", "tokens", "rows-under-token-training", "tokens-by-default"],
)
def test_forward_only_passes_have_their_own_micro_batches(tiny, forward, expected):
    """Old log-probs, reference log-probs and values come from passes sized by
    ``optim.forward_micro_batch_*`` (unset: 4 x the training's): the same numbers, in the passes
    those settings ask for; the training passes keep ``optim.micro_batch_*``. The policy's pass
    for pi_old covers the 6 rollout rows only (GRPO divides no other kind by pi_old), the
    reference's all 7."""
    model, tokenizer = tiny
    algorithm = get_algorithm("grpo")
    rows = make_rows(model.config.vocab_size, seed=3)
    policy, reference = Policy(copy.deepcopy(model)), Policy(copy.deepcopy(model))
    calls: list[int] = []
    policy.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))

    def prepared(config):
        batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
        calls.clear()
        with torch.no_grad():
            prepare(batch, policy, reference, algorithm, config, True)
        return batch, len(calls)

    base = settings(micro_batch_size=3, share_prompts=False, packing=False)
    config = dataclasses.replace(base, optim=dataclasses.replace(base.optim, **forward))
    batch_ref, passes_ref = prepared(base)
    batch, passes = prepared(config)
    assert passes_ref == 1 and passes == expected  # unset: 4 x micro_batch_size 3 rows, all 6
    mask = batch.response_mask
    assert batch.extras["old_logprobs"][6].eq(0).all()  # the sft row: no pi_old pass
    assert batch.extras["ref_logprobs"][6][mask[6]].ne(0).all()
    assert batch.extras["forward_passes"].tolist() == [2.0] * 6 + [1.0]  # for the step's FLOPs
    for key in ("old_logprobs", "ref_logprobs"):
        torch.testing.assert_close(
            batch.extras[key][mask], batch_ref.extras[key][mask], atol=1e-5, rtol=1e-5
        )
    training = plan_passes(batch, torch.arange(len(batch)), config, False)
    assert len(training) == (7 if config.optim.micro_batch_tokens else 3)


def rollout_groups(
    rewards: dict[int, list[float]], vocab: int, seed: int, prompt: int, response: tuple[int, int]
) -> list[Row]:
    """Rollout rows of random tokens: question q has a prompt of ``prompt + q`` tokens and one row
    a reward in ``rewards[q]``, the i-th ``response[0] + response[1] * i + q`` tokens long."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    return [
        Row(prompt_ids, tokens(response[0] + response[1] * i + q), "rollout", q, reward, 1.0)
        for q, prompt_ids in ((q, tokens(prompt + q)) for q in rewards)
        for i, reward in enumerate(rewards[q])
    ]


def test_rows_without_gradient_run_forward_only_with_the_same_update(tiny):
    """GRPO: a question whose rollouts all got the same reward has advantages 0; its rows run
    forward only (no backward), and the loss, every gradient and the entropy metric are those of
    running them forward and backward; skipped, the same loss and gradients, the entropy of the
    other rows. Where every row is such, one still runs backward, so the gradients are zeros
    (AdamW steps on them) rather than missing."""
    model, tokenizer = tiny
    algorithm = get_algorithm("grpo")
    rewards = {0: [1.0, 0.0, 1.0, 0.0], 1: [1.0, 1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0, 0.0]}
    rows = rollout_groups(rewards, model.config.vocab_size, seed=11, prompt=5, response=(3, 2))

    def run(rows, **optim):
        copy_ = copy.deepcopy(model)
        policy = Policy(copy_)
        grad_calls: list[bool] = []
        copy_.get_decoder().register_forward_pre_hook(
            lambda *_: grad_calls.append(torch.is_grad_enabled())
        )
        config = settings(micro_batch_size=4, mini_batch_questions=3, **optim)
        batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
        prepare(batch, policy, None, algorithm, config, True)
        grad_calls.clear()  # the update's passes only
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        metrics = update(batch, policy, optimizer, algorithm, config, True)
        grads = {n: p.grad for n, p in policy.named_parameters()}
        return metrics, grads, grad_calls

    metrics, grads, calls = run(rows)
    metrics_ref, grads_ref, calls_ref = run(rows, zero_gradient_rows="backward")
    metrics_skip, grads_skip, calls_skip = run(rows, zero_gradient_rows="skip")
    assert calls_ref == [True] * 3  # 12 rows, 4 a pass, all with backward
    assert calls.count(True) == 1 and calls.count(False) >= 1  # 8 rows forward only
    assert calls_skip == [True]  # the 4 rows of question 0 only
    for m in (metrics, metrics_ref, metrics_skip):
        assert m["rows_without_gradient"] == 8 / 12  # counted whatever ran for them
    assert abs(metrics["loss"] - metrics_ref["loss"]) <= 1e-6
    assert abs(metrics_skip["loss"] - metrics_ref["loss"]) <= 1e-6
    assert abs(metrics["entropy"] - metrics_ref["entropy"]) <= 1e-6
    # skipped: the entropy of question 0's rows alone
    alone, _, _ = run([r for r in rows if r.group == 0], zero_gradient_rows="backward")
    assert abs(metrics_skip["entropy"] - alone["entropy"]) <= 1e-6
    assert abs(metrics_skip["entropy"] - metrics_ref["entropy"]) > 1e-4
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-5, msg=name)
        torch.testing.assert_close(grads_skip[name], grad, atol=1e-7, rtol=1e-5, msg=name)
    # every question with equal rewards: one row still runs backward, the gradients are zeros
    still = [r for r in rows if r.group != 0]
    for mode in ("forward", "skip"):
        metrics, grads, calls = run(still, zero_gradient_rows=mode)
        assert calls.count(True) == 1 and (calls.count(False) >= 1) == (mode == "forward")
        assert all(g is not None and not g.any() for g in grads.values())


def test_skipped_rows_get_no_old_logprob_pass(tiny):
    """Under ``optim.zero_gradient_rows: skip``, prepare's forward-only pass for pi_old covers only
    the rows the update runs (the others' pi_old stays 0, never read): the computed rows' pi_old,
    and then the update's loss and gradients, are those of computing every row. Where a
    mini-batch's rows all lack gradient, its first row (which still runs backward) gets pi_old."""
    model, tokenizer = tiny
    algorithm = get_algorithm("grpo")
    # one question per mini-batch: 0 learns; 1 and 2 have equal rewards, their first rows run
    rewards = {0: [1.0, 0.0, 0.0], 1: [1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0]}
    rows = rollout_groups(rewards, model.config.vocab_size, seed=5, prompt=4, response=(2, 1))

    def run(mode: str, sampled: torch.Tensor | None = None):
        copy_ = copy.deepcopy(model)
        policy = Policy(copy_)
        seen: list[int] = []
        copy_.get_decoder().register_forward_pre_hook(
            lambda _m, _args, kwargs: seen.append(int(kwargs["input_ids"].shape[0])),
            with_kwargs=True,
        )
        config = settings(micro_batch_size=9, share_prompts=False, zero_gradient_rows=mode)
        batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
        if sampled is not None:  # the engine's log-probs, for rollout/logprob_gap
            batch.extras["sample_logprobs"] = sampled
        metrics = prepare(batch, policy, None, algorithm, config, True)
        prepared_rows = sum(seen)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        update_metrics = update(batch, policy, optimizer, algorithm, config, True)
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return batch, prepared_rows, metrics, update_metrics["loss"], grads

    batch_ref, rows_ref, _, loss_ref, grads_ref = run("forward")
    # the engine's log-probs equal to the trainer's: the gap is over the computed rows only
    batch, rows_skip, metrics, loss, grads = run("skip", batch_ref.extras["old_logprobs"])
    assert rows_ref == 9 and rows_skip == 5  # question 0's 3 rows, the first of 1 and of 2
    computed = torch.tensor([0, 1, 2, 3, 6])
    mask = batch.response_mask
    old, old_ref = batch.extras["old_logprobs"], batch_ref.extras["old_logprobs"]
    torch.testing.assert_close(old[computed][mask[computed]], old_ref[computed][mask[computed]])
    assert old_ref[4:6][mask[4:6]].ne(0).all() and old[4:6].eq(0).all()
    assert old[7:].eq(0).all()
    assert metrics["rollout/logprob_gap"] < 1e-6  # the uncomputed rows' zeros not counted
    assert_same_update(loss, grads, loss_ref, grads_ref)


@pytest.mark.parametrize("name", ["luffy", "hpt"])
def test_pi_old_pass_covers_only_the_kinds_that_divide_by_it(tiny, name):
    """LUFFY and HPT divide only rollout rows by pi_old: prepare's pass for it runs the rollout
    rows alone, and the update never reads the demonstration rows' pi_old (garbage there leaves
    the loss and every gradient as they were)."""
    model, tokenizer = tiny
    algorithm = get_algorithm(name)
    kinds = ["rollout", "rollout", "off_policy", "rollout", "rollout", "sft"]
    g = torch.Generator().manual_seed(8)
    rows = [
        Row(
            torch.randint(5, model.config.vocab_size, (4 + i % 2,), generator=g).tolist(),
            torch.randint(5, model.config.vocab_size, (3 + i,), generator=g).tolist(),
            kind,
            i // 3,
            float(i % 2),
            1.0,
        )
        for i, kind in enumerate(kinds)
    ]
    config = settings(micro_batch_size=2, share_prompts=False)
    policy = Policy(copy.deepcopy(model))
    seen: list[int] = []
    policy.model.get_decoder().register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    prepare(batch, policy, None, algorithm, config, True)
    assert sum(seen) == 4  # the 4 rollout rows
    demo = torch.tensor([2, 5])
    assert batch.extras["old_logprobs"][demo].eq(0).all()
    assert batch.extras["forward_passes"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]

    def updated(old_of_demos: float):
        changed = copy.deepcopy(batch)
        changed.extras["old_logprobs"][demo] = old_of_demos
        trained = Policy(copy.deepcopy(model))
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.0)
        loss = update(changed, trained, optimizer, algorithm, config, True)["loss"]
        return loss, {
            n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None
        }

    assert_same_update(*updated(-7.0), *updated(0.0))


def test_one_update_with_a_reference_runs_only_the_reference_forward(tiny):
    """GRPO with its KL penalty and one update a step (pi_old = pi_theta, nothing to recompute):
    prepare runs the reference model alone, over every row; the policy runs no forward pass."""
    model, tokenizer = tiny
    algorithm = get_algorithm("grpo", kl_coef=0.04)
    rows = make_rows(model.config.vocab_size, seed=4)[:6]  # rollout rows
    policy, reference = Policy(copy.deepcopy(model)), Policy(copy.deepcopy(model))
    calls = {"policy": 0, "reference": 0}
    for key, wrapped in (("policy", policy), ("reference", reference)):
        wrapped.model.get_decoder().register_forward_pre_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)
        )
    batch = collate(rows, tokenizer.pad_token_id, KIND_ID)
    metrics = prepare(batch, policy, reference, algorithm, settings(), False)
    assert calls == {"policy": 0, "reference": 1} and metrics["passes/forward"] == 1
    assert "old_logprobs" not in batch.extras
    assert batch.extras["ref_logprobs"][batch.response_mask].ne(0).all()
    assert batch.extras["forward_passes"].tolist() == [1.0] * 6
