"""The fused decode step replayed from a CUDA graph: one launch a token instead of hundreds.

On a GPU a one-token step of a small model is bound by the host, not the device: the fused step
(:class:`~hpt.rollout.fused.FusedStep`) issues about 44 kernels a layer (counted with a dispatch
mode: 314 ATen operations a token for 4 layers, 138 of them views), each costing Python and
launch time far above its few microseconds of work. Measured on an H200 (bf16, 24 layers of
Qwen2.5-0.5B's shape, 128 rows): 29 ms a token through the eager fused step, the host busy the
whole time. :class:`GraphedStep` captures the step once per decoded batch into a CUDA graph
(``torch.cuda.CUDAGraph``) and replays it for every later token.

A graph replays fixed kernels on fixed addresses, so the step runs on static buffers: the token,
the position and the attention mask over the whole preallocated cache (zeros past the filled
positions) are copied into buffers the graph reads, the new keys and values are written at a
position held in a one-element tensor (``FusedStep(..., slot=)``), and the logits land in a
buffer the graph owns. The graph is captured again when the batch changes: a new cache (each
:meth:`~hpt.rollout.decode.Decoder.decode` call) or rows leaving it (compaction reorders the
cache into new tensors). The capture costs about two eager steps. Each graph gets its own
memory pool: a pool shared through ``torch.cuda.graph_pool_handle()`` cannot be captured into
again once every graph using it is gone (measured on an H200, torch 2.11: the second batch's
capture hit the caching allocator's ``use_count > 0`` assertion), and a released graph's pool is
handed back when the allocator next runs short. :meth:`GraphedStep.release` drops the last
graph's references when a batch is done.

Each capture is checked: its first replay must give the logits of the eager warm-up run of the
same step on the same buffers (to 1% of the largest logit). A capture that fails (an operation a
graph cannot hold, such as a rotary embedding that reads positions back to the host) or disagrees
turns the graphs off for this engine with one warning, and the eager fused step decodes from
there on.

Attention then reads the whole cache under the mask instead of the filled positions only: the
masked positions get probability exactly 0, so the tokens are the eager step's (tests check
greedy tokens equal and log-probs to 1e-5, on CPU by :class:`GraphedStep`'s eager stand-in for
the graph, and on a GPU with real graphs).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hpt.rollout.fused import FusedStep

# the first replay of a capture against the eager warm-up of the same step: the largest logit
# difference allowed, as a fraction of 1 + the largest logit (a bf16 ulp at 16-32 is 0.125, which
# passes at a largest logit of 12 or more; a stale or broken graph is off by the logits' own size)
CHECK_TOLERANCE = 1e-2


class GraphMismatch(RuntimeError):
    """A captured step's replay did not reproduce its eager run."""


@dataclass
class _Capture:
    """One captured step: its input buffers, its output, what it was captured for, its replay."""

    cache: Any  # the cache object the graph writes into
    storage: list[torch.Tensor]  # each layer's keys tensor at capture (compaction replaces them)
    token: torch.Tensor  # [B, 1]
    mask: torch.Tensor  # [B, max_len]
    position: torch.Tensor  # [B, 1]
    slot: torch.Tensor  # [1]: the cache position the step writes
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [B, vocab]
    replay: Callable[[], None] = lambda: None

    def serves(self, token: torch.Tensor, cache: Any) -> bool:
        """Whether this graph computes the step for ``token``'s rows into ``cache`` as it is now."""
        return (
            self.cache is cache
            and self.token.shape == token.shape
            and all(layer.keys is keys for layer, keys in zip(cache.layers, self.storage))
        )

    def load(self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> None:
        """Copy this step's inputs into the buffers the graph reads."""
        filled = mask.shape[1] - 1
        self.token.copy_(token)
        self.position.copy_(position)
        self.mask[:, : filled + 1].copy_(mask)
        self.mask[:, filled + 1 :].zero_()
        self.slot.fill_(filled)


class GraphedStep:
    """``step(token [B, 1], mask [B, filled + 1], position [B, 1], cache) -> logits [B, vocab]``.

    :class:`~hpt.rollout.fused.FusedStep`'s step, replayed from a CUDA graph (see the module
    docstring). ``cache`` is the decoder's static cache of :class:`~hpt.rollout.decode.
    PrefixStaticLayer` layers; the step advances their ``filled`` count as the eager step does.
    The returned logits are the graph's output buffer: valid until the next call.

    Args:
        fused: the eager step whose computation is captured (its weights are read at capture:
            call ``fused.refresh()`` before each batch, as for the eager step).
        eager: run the step eagerly on the same static buffers instead of replaying a graph (the
            stand-in the CPU tests use: the same buffers, slots and recaptures, no CUDA).
    """

    def __init__(self, fused: FusedStep, *, eager: bool = False) -> None:
        self.fused = fused
        self.eager = eager
        self.captures = 0  # graphs captured so far (one per batch, and one per compaction)
        self.failure: str | None = None  # why the graphs were turned off (then: eager)
        self._capture: _Capture | None = None
        self._stream: Any = None  # the side stream warm-ups and captures run on

    @torch.no_grad()
    def __call__(
        self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        if self.failure is not None:
            return self.fused(token, mask, position, cache)
        capture = self._capture
        if capture is not None and capture.serves(token, cache):
            capture.load(token, mask, position)
            capture.replay()
        else:
            self.release()  # the old graph and its pool go first
            try:  # the capture's check has replayed this very step
                capture = self._capture = self._record(token, mask, position, cache)
            except RuntimeError as error:  # torch's capture errors, and GraphMismatch
                _end_rng_capture(token.device)
                self.failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                warnings.warn(
                    f"CUDA graph capture of the decode step failed ({self.failure}); "
                    "decoding eagerly from here on (rollout.cuda_graphs=false silences this)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self.fused(token, mask, position, cache)
        for layer in cache.layers:
            layer.filled = mask.shape[1]
        return capture.logits

    def release(self) -> None:
        """Drop the captured graph and its references to the batch's cache."""
        self._capture = None

    def _record(
        self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any
    ) -> _Capture:
        """Static buffers for this batch, and the step captured on them."""
        width = cache.layers[0].keys.shape[2]
        capture = _Capture(
            cache=cache,
            storage=[layer.keys for layer in cache.layers],
            token=torch.empty_like(token),
            mask=torch.zeros((mask.shape[0], width), dtype=mask.dtype, device=mask.device),
            position=torch.empty_like(position),
            slot=torch.zeros(1, dtype=torch.long, device=token.device),
        )
        capture.load(token, mask, position)

        def step() -> torch.Tensor:
            return self.fused(capture.token, capture.mask, capture.position, cache, capture.slot)

        self.captures += 1
        if self.eager:
            capture.logits = step()
            capture.replay = lambda: capture.logits.copy_(step())
            return self._checked(capture, capture.logits.clone())
        device = token.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream, current = self._stream, torch.cuda.current_stream(device)
        graph = torch.cuda.CUDAGraph()
        # on a side stream, as capture needs: a warm-up run first (cuBLAS workspaces, the
        # allocator), which computes this very step (the first replay writes the same values
        # again), then the capture. capture_begin/end rather than the torch.cuda.graph context,
        # which empties the allocator's cache at every capture (one a batch, one a compaction) and
        # would make the update allocate its memory from the driver again.
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            warm = step()
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                capture.logits = step()
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        capture.replay = graph.replay
        return self._checked(capture, warm)

    @staticmethod
    def _checked(capture: _Capture, warm: torch.Tensor) -> _Capture:
        """``capture``, once its first replay gave ``warm``'s logits (one host read a capture)."""
        capture.replay()
        error, scale = (capture.logits.float() - warm.float()).abs().max(), warm.abs().max()
        if not bool(error <= CHECK_TOLERANCE * (1 + scale.float())):  # one host read; NaN fails
            raise GraphMismatch(
                f"replayed logits differ from the eager step's by {float(error):.3g}"
            )
        return capture


def _end_rng_capture(device: torch.device) -> None:
    """Take the device's default CUDA generator out of graph-capture mode after a failed capture.

    ``capture_begin`` puts the generator in capture mode before it starts capturing, and only a
    ``capture_end`` that succeeds takes it out; after a failure, every random draw raises "Offset
    increment outside graph capture" (seen on an H200, torch 2.11). A clone of the generator's
    state (same seed and offset) is not in capture mode; set it back, where torch has the API.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    try:
        generator.graphsafe_set_state(generator.clone_state())
    except (AttributeError, RuntimeError):  # older torch: nothing to restore with
        pass
