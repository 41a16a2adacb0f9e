"""A vLLM rollout engine (the optional ``vllm`` extra), behind the same interface as HFEngine.

vLLM generates much faster than ``transformers.generate`` on GPUs. The engine runs vLLM in the
training process ("colocated"), and :meth:`VLLMEngine.sync_weights` copies the policy's current
weights into vLLM before each step's generation, so rollouts come from pi_theta.

Not exercised by the test suite (it needs vLLM and, in practice, a GPU): the suite checks only the
clear error when vLLM is missing. The weight copy uses vLLM's in-process model runner, whose
location has moved between vLLM releases; an unsupported release gets a one-line error naming it.
"""

from __future__ import annotations

from typing import Any

from hpt.errors import ConfigError
from hpt.rollout.base import Rollout, SamplingParams


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(
            "rollout.engine 'vllm' needs vLLM: pip install 'hybrid-post-training[vllm]' "
            "(or use rollout.engine: hf)"
        ) from error
    return vllm


class VLLMEngine:
    """``generate(prompts, n, sampling) -> list[Rollout]`` through ``vllm.LLM``.

    Args:
        model: the training model (its weights are synced into vLLM by :meth:`sync_weights`).
        tokenizer: its tokenizer (decoding and EOS).
        model_path: the folder or hub id vLLM loads the architecture (and first weights) from.
        gpu_memory_utilization: the share of GPU memory vLLM may take (colocated with training).
        max_model_len: the longest prompt + response.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
    ):
        vllm = _import_vllm()
        self.model, self.tokenizer = model, tokenizer
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
        )
        self._synced_version: int | None = None

    def sync_weights(self) -> None:
        """Copy the training model's current weights into vLLM's model."""
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            target = runner.model
        except AttributeError as error:
            raise ConfigError(
                f"vLLM {getattr(self._vllm, '__version__', '?')}: cannot reach its in-process model "
                "to sync weights; use rollout.engine: hf or a vLLM release with "
                "llm_engine.model_executor.driver_worker"
            ) from error
        target.load_weights(
            (name, tensor.detach()) for name, tensor in self.model.state_dict().items()
        )
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        """``n`` responses per prompt, prompt-major, with vLLM's sampled-token log-probs."""
        self.sync_weights()
        params = self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            logprobs=0,
        )
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        rollouts = []
        for index, (ids, output) in enumerate(zip(prompts, outputs)):
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                logprobs = None
                if completion.logprobs:
                    logprobs = [
                        float(step[token].logprob)
                        for step, token in zip(completion.logprobs, token_ids)
                    ]
                rollouts.append(
                    Rollout(
                        prompt_index=index,
                        prompt_ids=list(ids),
                        response_ids=token_ids,
                        text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                        finish_reason="length" if completion.finish_reason == "length" else "stop",
                        logprobs=logprobs,
                    )
                )
        return rollouts
