"""Batch assembly: from routed questions to tagged rows, from rows to padded tensors, and from
those to the micro-batches a forward pass sees (padded, or packed padding-free).

A *row* is one sequence the loss sees: a prompt and a response (a rollout the model generated, or
a question's demonstration), tagged with its kind (``rollout``, ``sft`` or ``off_policy``), its
question (the advantage group), its reward and its weight (the soft gate's alpha or beta).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Row:
    """One training sequence."""

    prompt_ids: list[int]
    response_ids: list[int]
    kind: str
    group: int
    reward: float
    weight: float = 1.0
    sample_logprobs: list[float] | None = None  # the rollout engine's log-prob of each token


@dataclass
class Batch:
    """Rows as right-padded tensors, responses aligned at column 0.

    Shapes: ``input_ids``/``attention_mask`` [N, L] (prompt + response, right padded);
    ``response_index`` [N, T] positions in ``input_ids`` whose hidden state predicts response token t;
    ``labels`` [N, T]; ``response_mask`` [N, T] bool; the rest [N].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_index: torch.Tensor
    labels: torch.Tensor
    response_mask: torch.Tensor
    kinds: torch.Tensor
    group: torch.Tensor
    rewards: torch.Tensor
    row_weights: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # packed micro-batches only (see :meth:`pack`): [1, S] positions restarting at 0 in each row
    position_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """The same rows on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        positions = None if self.position_ids is None else self.position_ids.to(device)
        extras = {k: v.to(device) for k, v in self.extras.items()}
        return Batch(**moved, extras=extras, position_ids=positions)

    def lengths(self) -> torch.Tensor:
        """[N] tokens of each row (prompt + response)."""
        return self.attention_mask.sum(1)

    def pack(self, index: torch.Tensor | slice) -> Batch:
        """Rows ``index`` concatenated into one padding-free sequence.

        ``input_ids``/``attention_mask``/``position_ids`` become [1, S] with S the rows' total
        length and positions restarting at 0 in each row: the model's attention (transformers'
        packed-sequence mask, or flash-attention's varlen path) then keeps each row to itself, and
        no compute is spent on padding. ``response_index`` points into the packed sequence; the
        per-row tensors (labels, masks, extras) are those of :meth:`select`.
        """
        rows = self.select(index)
        lengths = rows.lengths()
        keep = rows.attention_mask.bool()  # right padded: each row's tokens come first
        starts = torch.cumsum(lengths, 0) - lengths
        total = int(lengths.sum())
        positions = torch.cat([torch.arange(int(n), device=lengths.device) for n in lengths])
        # padding positions of a row may point past its end: they are masked, keep them in range
        index_in_pack = (rows.response_index + starts[:, None]).clamp(max=max(total - 1, 0))
        return replace(
            rows,
            input_ids=rows.input_ids[keep][None],
            attention_mask=torch.ones((1, total), dtype=rows.attention_mask.dtype),
            response_index=index_in_pack,
            position_ids=positions[None],
        )

    def select(self, index: torch.Tensor | slice) -> Batch:
        """Rows ``index`` (a micro-batch), trimmed to their own longest sequence."""
        mask = self.attention_mask[index]
        length = int(mask.sum(1).max().item()) if mask.numel() else 1
        width = int(self.response_mask[index].sum(1).max().item()) if mask.numel() else 1
        width = max(width, 1)
        return Batch(
            input_ids=self.input_ids[index][:, :length],
            attention_mask=mask[:, :length],
            response_index=self.response_index[index][:, :width].clamp(max=max(length - 1, 0)),
            labels=self.labels[index][:, :width],
            response_mask=self.response_mask[index][:, :width],
            kinds=self.kinds[index],
            group=self.group[index],
            rewards=self.rewards[index],
            row_weights=self.row_weights[index],
            extras={
                k: v[index][:, :width] if v.dim() == 2 else v[index] for k, v in self.extras.items()
            },
        )


_TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "response_index",
    "labels",
    "response_mask",
    "kinds",
    "group",
    "rewards",
    "row_weights",
)


def collate(rows: list[Row], pad_id: int, kind_ids: dict[str, int]) -> Batch:
    """Pad ``rows`` into a :class:`Batch` (prompt + response, right padded)."""
    n = len(rows)
    length = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    width = max(max(len(r.response_ids) for r in rows), 1)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    response_index = torch.zeros((n, width), dtype=torch.long)
    for i, row in enumerate(rows):
        p, r = len(row.prompt_ids), len(row.response_ids)
        input_ids[i, : p + r] = torch.tensor(row.prompt_ids + row.response_ids, dtype=torch.long)
        attention_mask[i, : p + r] = 1
        if r:
            labels[i, :r] = torch.tensor(row.response_ids, dtype=torch.long)
            response_mask[i, :r] = True
        # hidden state at position p - 1 + t predicts response token t
        response_index[i] = (torch.arange(width) + p - 1).clamp(min=0, max=length - 1)
    extras = {}
    if any(row.sample_logprobs is not None for row in rows):
        sampled = torch.zeros((n, width), dtype=torch.float32)
        for i, row in enumerate(rows):
            if row.sample_logprobs:
                sampled[i, : len(row.sample_logprobs)] = torch.tensor(row.sample_logprobs)
        extras["sample_logprobs"] = sampled
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_index=response_index,
        labels=labels,
        response_mask=response_mask,
        kinds=torch.tensor([kind_ids[r.kind] for r in rows], dtype=torch.long),
        group=torch.tensor([r.group for r in rows], dtype=torch.long),
        rewards=torch.tensor([r.reward for r in rows], dtype=torch.float32),
        row_weights=torch.tensor([r.weight for r in rows], dtype=torch.float32),
        extras=extras,
    )


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``."""
    size = max(1, size)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


PROMPT_WIDTH_MULTIPLE = 16  # shared prompt passes are padded to a multiple of this width
# A pass that leaves the responses' padding out (one decoder call on a CPU) splits its rows into
# prompts and responses even where no prompt repeats (:func:`share_prompts` ``unpad_at``) when
# that drops at least this fraction of the padded rows' tokens. Measured on 2 CPU cores, forward
# and backward of 8 rows with 24-30-token prompts, each its own: tiny model, 13.5% of the tokens
# dropped 62-65 ms against 68-71 ms padded, 8% 69-72 against 69-71 ms, 1% 73-75 against 71-72 ms,
# 27% 83-85 against 102-108 ms; SmolLM2-135M, 16% dropped, 3.3-3.8 s against 4.6-5.0 s.
UNPAD_AT = 0.125


def rounded_up(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of :data:`PROMPT_WIDTH_MULTIPLE`."""
    return -(-tokens // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE


@dataclass
class _Pass:
    """A pass being filled by :func:`token_micro_batches`: its rows and what its cost depends on."""

    rows: list[int] = field(default_factory=list)
    tokens: int = 0  # the rows' total length
    longest: int = 0  # the longest row
    prompts: set[int] = field(default_factory=set)  # the distinct prompt keys (shared passes)
    width: int = 0  # the longest prompt
    response: int = 0  # the longest response
    responses: int = 0  # the responses' total length

    def cost_with(
        self, length: int, shared: tuple[int, int] | None, packed: bool, unpadded: bool = False
    ) -> int:
        """The pass's tokens with one more row of ``length`` (``shared``: its prompt key and
        length, for passes that run each distinct prompt once; ``unpadded``: such passes leave
        the responses' padding out, as :func:`share_prompts` with ``unpad_at`` decides)."""
        if packed:
            return self.tokens + length
        count = len(self.rows) + 1
        padded = count * max(self.longest, length)
        if shared is None:
            return padded
        key, prompt = shared
        width = rounded_up(max(self.width, prompt))
        groups = len(self.prompts) + (key not in self.prompts)
        if not unpadded:
            return groups * width + count * max(self.response, length - prompt)
        responses = self.responses + length - prompt  # rounded up as real_positions rounds
        split = groups * width + rounded_up(responses)
        if groups < count or split <= (1 - UNPAD_AT) * padded:
            return split
        return padded  # every prompt its own and little padding: the rows run padded

    def add(self, row: int, length: int, shared: tuple[int, int] | None) -> _Pass:
        self.rows.append(row)
        self.tokens += length
        self.longest = max(self.longest, length)
        if shared is not None:
            self.prompts.add(shared[0])
            self.width = max(self.width, shared[1])
            self.response = max(self.response, length - shared[1])
            self.responses += length - shared[1]
        return self


def token_micro_batches(
    lengths: torch.Tensor,
    max_tokens: int,
    packed: bool,
    prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
    unpadded: bool = False,
) -> list[torch.Tensor]:
    """Rows grouped into passes of at most ``max_tokens`` tokens (verl's dynamic batch size).

    First-fit decreasing: rows, longest first (with ``prompts``: question by question, the
    largest first), go into the first pass with room. A pass costs the
    rows' total length when ``packed``; else rows x its longest row (the padded width), or, with
    ``prompts`` = (each row's prompt key [N], its prompt length [N]) for passes that run each
    distinct prompt once (:func:`share_prompts` wherever a prompt repeats), its distinct prompts
    at the widest one's width (a multiple of :data:`PROMPT_WIDTH_MULTIPLE`) plus rows x its
    longest response; with ``unpadded`` too (one decoder call on a CPU, which leaves the
    responses' padding out), the prompts plus the responses' total length rounded up to that
    multiple, or the padded rows where no prompt repeats and that drops less than
    :data:`UNPAD_AT` of them (:func:`share_prompts` then runs them padded). A row longer than
    ``max_tokens`` gets a pass of its own. Returns each
    pass's row indices, ascending. The loss is normalised over the whole mini-batch, so how rows
    are grouped does not change it.
    """
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    size = lengths.tolist()
    keys, widths = (prompts[0].tolist(), prompts[1].tolist()) if prompts is not None else ([], [])
    if prompts is not None:  # a question's rows one after another (largest question first)
        total: dict[int, int] = {}
        for i, key in enumerate(keys):
            total[key] = total.get(key, 0) + size[i]
        order.sort(key=lambda i: (-total[keys[i]], keys[i]))  # stable: longest row first within
    passes: list[_Pass] = []
    for i in order:
        shared = (keys[i], widths[i]) if prompts is not None else None
        for candidate in passes:
            if candidate.cost_with(size[i], shared, packed, unpadded) <= max_tokens:
                candidate.add(i, size[i], shared)
                break
        else:
            passes.append(_Pass().add(i, size[i], shared))
    return [torch.tensor(sorted(p.rows), dtype=torch.long) for p in passes]


@dataclass
class SharedPrompts:
    """A padded micro-batch split into its distinct prompts and each row's response.

    Rows of one question share their prompt token for token (its rollouts, its demonstration); a
    forward pass then runs each distinct prompt once and every response on top of its prompt's
    KV cache, instead of every row's prompt again (:meth:`hpt.train.policy.Policy.forward`).

    Shapes: ``prompt_ids``/``prompt_mask`` [G, P] (right padded); ``prompt_of_row`` and
    ``prompt_lengths`` [N]; ``response_ids``/``response_mask`` [N, R] (right padded, response
    tokens only).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_of_row: torch.Tensor
    prompt_lengths: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def real_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The flat indices (ascending) of ``mask``'s true positions (the tokens, not the padding),
    with the first false ones added up to a multiple of :data:`PROMPT_WIDTH_MULTIPLE`, where some
    are false and ``mask`` is on a CPU; None otherwise (every position then runs). On a GPU
    finding them would read the mask back to the host every pass, where an update reads once.

    The multiple keeps the number of distinct matrix shapes small. Under CPU bf16 autocast oneDNN
    compiles a kernel per shape and keeps up to 1024 in each of two caches: 300 tiny-model passes
    of 8 responses of 8-64 tokens (one shared prompt, one decoder call) took the process's peak
    RSS to 1534 MiB with the exact token counts, 840 MiB rounded up, 1420 MiB as padded rows (446
    MiB in float32, where MKL keeps nothing per shape). The padding positions added compute what
    padded rows would; callers mask their outputs as they would the padding's.
    """
    if mask is None:
        return None
    mask = mask.bool().reshape(-1)
    if mask.device.type != "cpu" or bool(mask.all()):
        return None
    real = mask.nonzero().squeeze(1)
    extra = -real.numel() % PROMPT_WIDTH_MULTIPLE
    if real.numel() + extra >= mask.numel():
        return None
    if extra:
        real = torch.cat([real, (~mask).nonzero().squeeze(1)[:extra]]).sort().values
    return real


def share_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_index: torch.Tensor,
    min_saved: int = 1,
    unpad_at: float | None = None,
) -> SharedPrompts | None:
    """Split right-padded rows (:func:`collate`) into distinct prompts and responses.

    A row's prompt is its first ``response_index[:, 0] + 1`` tokens (the hidden state of the
    prompt's last token predicts the first response token). Returns None when every row's prompt
    is its own (nothing to share), or when sharing saves fewer than ``min_saved`` prompt tokens;
    unless ``unpad_at`` is given and the split (its prompts at their padded width, the responses
    without padding) holds at most ``1 - unpad_at`` of the padded rows' tokens: for a pass that
    leaves the responses' padding out (one decoder call on a CPU, :data:`UNPAD_AT`), the split
    then pays even where no prompt repeats.
    """
    from hpt.utils import distinct_rows

    lengths = attention_mask.sum(1)
    prompt_lengths = response_index[:, 0] + 1
    row_prompts = [row[:p] for row, p in zip(input_ids.tolist(), prompt_lengths.tolist())]
    first, prompt_of_row = distinct_rows(row_prompts)
    prompts = [row_prompts[i] for i in first]
    # the width rounded up to a multiple: fewer distinct matrix shapes, each of which costs a
    # compiled kernel in oneDNN's caches under CPU bf16 autocast (tiny model, bf16 benchmark: peak
    # RSS 649 against 731 MiB at a multiple of 8, step time unchanged; 16 took the 128-token case
    # from 719-726 to 697-704 MiB, below TRL's, no slower); the padding is masked like any other
    width = rounded_up(max(len(p) for p in prompts))
    saved = sum(len(p) for p in row_prompts) - sum(len(p) for p in prompts)
    shares = len(first) < len(row_prompts) and saved >= max(min_saved, 1)
    split_tokens = len(prompts) * width + int((lengths - prompt_lengths).sum())
    unpads = unpad_at is not None and split_tokens <= (1 - unpad_at) * input_ids.numel()
    if not (shares or unpads):
        return None
    prompt_ids = torch.zeros((len(prompts), width), dtype=input_ids.dtype)
    prompt_mask = torch.zeros((len(prompts), width), dtype=attention_mask.dtype)
    for g, tokens in enumerate(prompts):
        prompt_ids[g, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        prompt_mask[g, : len(tokens)] = 1
    response_lengths = lengths - prompt_lengths
    span = max(int(response_lengths.max()), 1)
    steps = torch.arange(span, device=input_ids.device)
    index = (prompt_lengths[:, None] + steps).clamp(max=input_ids.shape[1] - 1)
    response_mask = (steps < response_lengths[:, None]).to(attention_mask.dtype)
    return SharedPrompts(
        prompt_ids=prompt_ids.to(input_ids.device),
        prompt_mask=prompt_mask.to(attention_mask.device),
        prompt_of_row=torch.tensor(prompt_of_row, dtype=torch.long, device=input_ids.device),
        prompt_lengths=prompt_lengths,
        response_ids=input_ids.gather(1, index) * response_mask,
        response_mask=response_mask,
    )
