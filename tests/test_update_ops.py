"""Host reads of one update: a constant number, however many passes it runs.

On a GPU every read of a device value (``float(t)``, ``.item()``, ``.tolist()``, ``nonzero`` and
boolean-mask indexing) waits for all the kernels queued before it. The update's loss and metrics
are summed on the device and read once at its end; a read a pass (a metric turned into a float
after every backward) would make each pass wait for the last. Counted here with a dispatch mode.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hpt.algorithms import get_algorithm
from hpt.estimator.unified import KIND_ID, batch_counts, unified_loss
from hpt.train.batch import collate
from hpt.train.policy import Policy
from hpt.train.step import update
from test_packing import make_rows, settings

READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select"}
# where a pass may read by design: the model's own code, and the batch's CPU copy, which
# Batch.select reads to trim a pass to its rows' longest sequence (no device involved); kind ids
# are checked only where they are CPU tensors (_as_long), which on a GPU they are not; padding is
# skipped only where the mask is on a CPU (batch.py:real_positions)
EXEMPT = ("/transformers/", "batch.py:select", "unified.py:_as_long", "batch.py:real_positions")


def _origin() -> str:
    """``file:function`` frames of the caller's stack, innermost first, joined."""
    frames, frame = [], sys._getframe(2)
    while frame is not None:
        frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " ".join(frames)


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values to the host, by kind, leaving out :data:`EXEMPT` ones."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.active = False

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self.active = False
        return super().__exit__(*exc)

    def count(self, name: str) -> None:
        origin = _origin()
        if self.active and not any(place in origin for place in EXEMPT):
            self.reads[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if name in READ_OPS or boolean_index:
            self.count(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """A :class:`HostReads` factory that also counts ``Tensor.tolist`` (which on the CPU
    dispatches nothing)."""
    modes: list[HostReads] = []
    tolist = torch.Tensor.tolist

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        for mode in modes:
            mode.count("tolist")
        return tolist(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def make() -> HostReads:
        mode = HostReads()
        modes.append(mode)
        return mode

    return make


def reads_of_update(tiny, host_reads, algorithm_name: str, micro_batch_size: int) -> Counter:
    model, tokenizer = tiny
    algorithm = get_algorithm(algorithm_name)
    policy = Policy(model)
    batch = collate(make_rows(model.config.vocab_size, seed=2), tokenizer.pad_token_id, KIND_ID)
    batch.extras["advantages"] = torch.linspace(-1.0, 1.0, len(batch))
    config = settings(micro_batch_size=micro_batch_size, share_prompts=False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # lr 0: the shared model stays
    mode = host_reads()
    with mode:
        update(batch, policy, optimizer, algorithm, config, need_old=False)
    return mode.reads


@pytest.mark.parametrize("algorithm_name", ["grpo", "hpt"])
def test_update_reads_the_host_a_constant_number_of_times(tiny, host_reads, algorithm_name):
    # 7 rows in 2 questions, one optimiser step a question: 2 passes against 7
    few = reads_of_update(tiny, host_reads, algorithm_name, micro_batch_size=8)
    many = reads_of_update(tiny, host_reads, algorithm_name, micro_batch_size=1)
    assert few == many
    # per optimiser step: its rows' counts and the gradient norm; per update: the sums at its
    # end; and the rows of each mini-batch (torch.unique and nonzero over the CPU batch) and their
    # split into rows with and without gradient (two boolean selections over the CPU batch)
    assert sum(many.values()) <= 12, many


def test_unified_loss_reads_nothing_until_its_metrics_are(host_reads):
    algorithm = get_algorithm("hpt")
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 5, generator=g, requires_grad=True)
    mask = torch.rand(6, 5, generator=g) > 0.3
    kinds = torch.tensor([0, 0, 0, 1, 1, 0])
    counts = batch_counts(algorithm, kinds, mask)  # the mini-batch's, counted once by the trainer
    mode = host_reads()
    with mode:
        out = unified_loss(
            algorithm,
            logprobs,
            logprobs.detach() - 0.1,
            torch.linspace(-1.0, 1.0, 6),
            mask,
            kinds=kinds,
            entropy=torch.rand(6, 5, generator=g),
            counts=counts,
        )
        out.loss.backward()
        assert not mode.reads
        metrics = out.metrics
    assert sum(mode.reads.values()) == 1  # every metric in one copy
    assert metrics["sequences_sft"] == 2 and metrics["tokens_rollout"] == float(
        mask[kinds == 0].sum()
    )


def test_update_reuses_the_output_heads_buffers_and_frees_them_after(tiny):
    """On a CPU the update's passes take their [tokens, vocab] head buffers from
    ``likelihood.HEAD_BUFFERS``: 7 passes share a few buffers, and none outlives the update."""
    from hpt.estimator import likelihood

    model, tokenizer = tiny
    policy = Policy(model)
    batch = collate(make_rows(model.config.vocab_size, seed=2), tokenizer.pad_token_id, KIND_ID)
    batch.extras["advantages"] = torch.linspace(-1.0, 1.0, len(batch))
    config = settings(micro_batch_size=1, share_prompts=False)  # 7 rows: 7 passes
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    buffers = likelihood.HEAD_BUFFERS
    taken, allocated = buffers.taken, buffers.allocated
    update(batch, policy, optimizer, get_algorithm("grpo"), config, need_old=False)
    taken, allocated = buffers.taken - taken, buffers.allocated - allocated
    assert taken >= 2 * 7  # a logits and a log p buffer each pass
    # passes of 4 to 27 tokens: a new buffer only when a pass outgrows the free ones
    assert allocated <= taken // 2, (taken, allocated)
    assert buffers._free == [] and buffers.active == 0
