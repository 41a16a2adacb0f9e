"""The config schema: one pydantic dataclass a section, one ``Field(description=...)`` a key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict

from hpt.train.config.errors import _config_error, _fields, _Source

_SCHEMA = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


def _number(value: Any) -> Any:
    """Numbers as a command line writes them: ``"1e-5"`` (YAML reads no-dot exponents as text)
    is a number; a bool (an int in Python) is not."""
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value  # pydantic rejects it, naming the type
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]


def _section(cls: type) -> type:
    """A config section: a pydantic dataclass whose assignments raise a one-line ConfigError."""
    cls = dataclass(config=_SCHEMA)(cls)
    validated_setattr = cls.__setattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        try:
            validated_setattr(self, name, value)
        except ValidationError as error:
            raise _config_error(
                error, {name: value}, _Source(), type(self), type(self).__name__
            ) from None

    cls.__setattr__ = __setattr__
    return cls


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@_section
class ModelConfig:
    """The policy model and its tokenizer."""

    path: str | None = Field(
        None,
        description="Hugging Face model id or local folder; null: the embedded tiny demo model",
    )
    tokenizer: str | None = Field(
        None, description="tokenizer id or folder; null: the same as `path`"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="parameter dtype; auto: the dtype stored in the checkpoint"
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `path` to load instead of safetensors"
    )
    rope_theta: Float | None = Field(
        None, description="override the RoPE base (the paper: 40000 for Qwen2.5-Math)", gt=0
    )
    max_position_embeddings: Int | None = Field(
        None, description="override the context length (the paper: 16384 for Qwen2.5-Math)", gt=0
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    trust_remote_code: bool = Field(
        False, description="allow model code from the hub (only for trusted models)"
    )


@_section
class LoraConfig:
    """LoRA adapters on the policy (peft); r = 0 trains every weight."""

    r: Int = Field(0, description="adapter rank; 0: off (full fine-tuning)", ge=0)
    alpha: Float = Field(16.0, description="LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: Float = Field(0.0, description="dropout on the adapters' input", ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="names of the linear layers that get adapters",
    )
    merge: bool = Field(False, description="also write a merged model to final/merged")


@_section
class DataConfig:
    """Training questions, their demonstrations, prompts and length limits."""

    train: str | None = Field(
        None,
        description="training questions: .json/.jsonl/.parquet file, folder or HF dataset id; "
        "null: the demo's synthetic task",
    )
    split: str | None = Field("train", description="dataset split to read for an HF dataset id")
    fields: dict[str, str] | None = Field(
        None,
        description="map our field names (prompt, answer, demonstration, ...) to dotted paths "
        "in a row",
    )
    limit: Int | None = Field(None, description="use only the first N training questions", gt=0)
    system_prompt: str | None = Field(
        None, description="system message prepended to chat prompts; null: none"
    )
    instruction: str | None = Field(
        None,
        description="text appended to each question, e.g. 'put your final answer within \\boxed{}'",
    )
    template: str | None = Field(
        None,
        description="plain prompt with {question} (or a name: llama) for base models; "
        "null: the tokenizer's chat template",
    )
    drop_system: bool = Field(
        False, description="remove system messages found in the data's chat prompts"
    )
    reward: str = Field("math", description="verifier: math, choice, or module:function")
    reward_timeout: Float = Field(
        5.0, description="seconds allowed to score one response (then it scores 0)", gt=0
    )
    max_prompt_tokens: Int = Field(1024, description="prompts longer than this are dropped", gt=0)
    max_response_tokens: Int = Field(
        1024, description="the response budget of rollouts and demonstrations, in tokens", gt=0
    )
    overlong_demonstrations: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="demonstrations longer than max_response_tokens: drop the demonstration "
        "(counted and reported), truncate it, or stop with an error",
    )
    questions_per_step: Int = Field(
        16, description="questions sampled per training step (the batch)", gt=0
    )
    shuffle: bool = Field(True, description="reshuffle the questions every epoch (seeded)")


@_section
class RolloutConfig:
    """Sampling of the online responses."""

    n: Int = Field(8, description="responses sampled per question", gt=0)
    temperature: Float = Field(1.0, description="sampling temperature", ge=0)
    top_p: Float = Field(1.0, description="nucleus sampling threshold", gt=0, le=1)
    top_k: Int = Field(0, description="top-k sampling; 0: off", ge=0)
    max_new_tokens: Int | None = Field(
        None, description="response length limit; null: data.max_response_tokens", gt=0
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="generation engine: hf (transformers) or vllm"
    )
    batch_size: Int = Field(64, description="sequences generated together by the hf engine", gt=0)
    compile: bool = Field(False, description="torch.compile the hf engine's decode step")
    fused: bool = Field(
        True,
        description="the hf engine decodes Llama-layout models (Llama, Qwen2, Mistral) with a "
        "fused one-token step (the model's own weight tensors, no per-module Python or 4-D "
        "mask); false: the model's forward",
    )
    cuda_graphs: bool = Field(
        False,
        description="on a CUDA device the hf engine replays the fused decode step from a CUDA "
        "graph (one launch a token instead of ~44 kernels a layer); opt-in until a GPU run of "
        "the current code confirms it (its first GPU run failed at the second capture, fixed "
        "since)",
    )
    pack_weights: bool = Field(
        True,
        description="on a CPU in float32 the hf engine's fused decode step packs the weights for "
        "each batch of 16 or more new tokens with MKL's packed GEMM (faster matmuls; a copy as "
        "large as the weights while the batch decodes, dropped before the update); false: plain "
        "matmuls, no copy",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="weights of the fused decode step; auto: the model's dtype. bfloat16 on a "
        "float32 model samples from a bf16 copy (faster decoding; pi_old is then recomputed, "
        "as for a bf16 vLLM engine)",
    )
    old_logprobs: Literal["auto", "engine", "recompute"] = Field(
        "auto",
        description="pi_old of rollout tokens when a step makes several updates: engine (the "
        "log-probs sampling returned, no extra forward pass), recompute (a forward pass of the "
        "trainer), auto: engine where they are exact (hf engine, no top-k/top-p, ddp), else "
        "recompute",
    )


@_section
class OptimConfig:
    """AdamW, the learning-rate schedule and the update's safety checks."""

    lr: Float = Field(5e-6, description="AdamW learning rate (the paper's HPT: 5e-6)", gt=0)
    weight_decay: Float = Field(0.01, description="AdamW weight decay", ge=0)
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="AdamW betas")
    eps: Float = Field(1e-8, description="AdamW epsilon", gt=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule after warmup"
    )
    warmup_steps: Int = Field(0, description="linear warmup steps", ge=0)
    min_lr_ratio: Float = Field(
        0.0, description="cosine schedule: final lr as a fraction of the peak", ge=0, le=1
    )
    grad_clip: Float = Field(
        1.0, description="clip the gradient norm to this; .inf: no clipping", gt=0
    )
    skip_grad_norm_above: Float = Field(
        80.0,
        description="skip the update when the gradient norm is above this or not finite; "
        ".inf: never",
        gt=0,
    )
    mini_batch_questions: Int | None = Field(
        None, description="questions per optimiser mini-batch; null: one update per step", gt=0
    )
    micro_batch_size: Int = Field(
        8, description="rows per forward/backward pass (gradient accumulation)", gt=0
    )
    micro_batch_tokens: Int = Field(
        0,
        description="tokens per forward/backward pass, rows grouped to fill it (dynamic batch "
        "size, as verl's use_dynamic_bsz); 0: micro_batch_size rows a pass",
        ge=0,
    )
    forward_micro_batch_size: Int | None = Field(
        None,
        description="rows per forward-only pass (old log-probs, reference log-probs, values: no "
        "activations kept, so it can exceed micro_batch_size, as verl's "
        "log_prob_micro_batch_size_per_gpu; measured on CPU, the tiny model's old + reference "
        "passes over 128 rows 18% faster at 32 than at 8); null: 4 x micro_batch_size",
        gt=0,
    )
    forward_micro_batch_tokens: Int | None = Field(
        None,
        description="tokens per forward-only pass (as verl's log_prob_max_token_len_per_gpu); "
        "null: 4 x micro_batch_tokens; 0: forward_micro_batch_size rows a pass",
        ge=0,
    )
    zero_gradient_rows: Literal["forward", "backward", "skip"] = Field(
        "forward",
        description="rows that add nothing to the loss or its gradient (advantage 0 at every "
        "token, as a GRPO group whose rollouts all got the same reward, with no entropy, KL or "
        "value term): forward runs them forward only, in passes of their own, so the update's "
        "metrics cover them (the same gradient: their tokens still count in the normalisers); "
        "backward runs them forward and backward as TRL and verl do; skip leaves them out, "
        "and out of the recomputed pi_old pass (the same gradient; entropy, ratio, clip and "
        "logprob-gap metrics then cover the other rows only, as after DAPO's group filtering)",
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="concatenate a pass's rows into one padding-free sequence (position ids "
        "restart per row); false: right-padded rows; auto: packed where the model's attention "
        "has a varlen kernel (flash-attention), padded otherwise (SDPA/eager attend over the "
        "whole packed sequence with a block-diagonal mask, slower: 1.2-1.7x measured on CPU)",
    )
    share_prompts: bool | Literal["auto"] = Field(
        "auto",
        description="a padded pass runs each distinct prompt once and its rows' responses on "
        "top of it (the rollouts and demonstration of a question share its prompt): one decoder "
        "call for Llama/Qwen2/Qwen3/Mistral without sliding windows, two (a KV cache) elsewhere; "
        "auto: on where it applies (padded passes on the CPU, no gradient checkpointing; under "
        "FSDP2 in one call only), wherever a prompt repeats in one call and where a pass saves "
        "at least 128 prompt tokens in two; off on GPUs (not yet measured there with one call); "
        "on, a CPU pass in one call also runs rows whose prompts are all their own as one "
        "sequence when leaving the responses' padding out drops at least 1/8 of its tokens",
    )
    compile: bool = Field(
        False,
        description="torch.compile the decoder layers for the training passes (measured on CPU: "
        "the update 15% faster in float32 and 25% under bf16 autocast, after 20-40 s of "
        "compilation the first time: inductor's on-disk cache serves later runs in seconds; the "
        "rollout engine stays eager)",
    )
    autocast: bool | Literal["auto", "bfloat16"] = Field(
        "auto",
        description="mixed precision of the training passes: bfloat16 (or true) runs them under "
        "torch.autocast (matmuls in bf16; float32 weights, gradients and optimiser state, "
        "float32 log-probs); auto: bfloat16 for float32 weights on a GPU with bf16 under ddp (as "
        "TRL's bf16=True), false on CPU (measured on a CPU with AMX: SmolLM2-135M's update 30% "
        "faster, the tiny model's about 20%, its shared-prompt attention kept in float32 there); "
        "fsdp2 uses distributed.mixed_precision instead",
    )
    ppo_epochs: Int = Field(1, description="passes over each step's batch", gt=0)
    value_coef: Float = Field(0.5, description="weight of the value loss (PPO with GAE only)", ge=0)
    logits_chunk_size: Int = Field(
        4096,
        description="tokens per chunk of the output head (bounds the logits memory); a pass "
        "within one chunk keeps its log-probs for backward instead of recomputing the logits",
        gt=0,
    )


@_section
class DistributedConfig:
    """Data-parallel training under torchrun (one process per device)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="data-parallel strategy under torchrun: ddp replicates the model, fsdp2 "
        "shards each decoder layer with torch.distributed.fsdp.fully_shard",
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="fsdp2 parameter dtype in forward/backward; auto: bf16 on GPUs that support "
        "it, else fp32; gradients reduce in fp32",
    )


@_section
class EvalConfig:
    """Held-out evaluation before, during and after training."""

    every: Int = Field(
        0, description="evaluate every N steps; 0: only before and after training", ge=0
    )
    sets: dict[str, str] = Field(
        default_factory=dict,
        description="held-out sets, name -> file, folder or HF id; accuracy logged as eval/<name>",
    )
    k: Int = Field(1, description="samples per question (accuracy is avg@k)", gt=0)
    temperature: Float = Field(0.6, description="sampling temperature", ge=0)
    top_p: Float = Field(0.95, description="nucleus sampling threshold", gt=0, le=1)
    max_new_tokens: Int | None = Field(
        None, description="response length limit; null: data.max_response_tokens", gt=0
    )
    limit: Int | None = Field(None, description="evaluate only the first N questions", gt=0)
    benchmarks: list[str] = Field(
        default_factory=list,
        description="benchmark names or paths evaluated after training with hpt eval",
    )


@_section
class LoggingConfig:
    """What a run writes besides metrics.jsonl."""

    tensorboard: bool = Field(
        False, description="also write TensorBoard events (needs tensorboard installed)"
    )
    progress: bool = Field(
        True,
        description="show a progress bar (only on a terminal): steps, reward, routes, tokens a "
        "second, elapsed time and ETA",
    )
    plots: bool = Field(True, description="draw PNG plots of the run when it ends")


@_section
class DemoConfig:
    """The embedded demo: a tiny model warmed up on a synthetic task (used when model.path is null)."""

    size: str = Field("tiny", description="size of the tiny model (hpt.demo.tiny.build_model)")
    pretrain_steps: Int = Field(
        400,
        description="SFT warm-up steps on the easy split so the model solves some questions",
        ge=0,
    )
    pretrain_lr: Float = Field(1e-3, description="learning rate of the warm-up", gt=0)
    train_questions: Int = Field(
        2000, description="synthetic post-training questions (the train split)", gt=0
    )
    test_questions: Int = Field(
        400,
        description="synthetic held-out questions in each of the val, test and ood splits",
        gt=0,
    )


def _overrides_of(section: type) -> Any:
    """A stage's partial ``section``: any subset of its keys, each validated as in the section.

    A TypedDict (total=False) validates to a plain dict that holds only the keys given.
    """
    keys = {
        name: Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        for name, info in _fields(section).items()
    }
    partial = TypedDict(f"{section.__name__}Overrides", keys, total=False)  # type: ignore[misc]
    partial.__pydantic_config__ = _SCHEMA  # type: ignore[attr-defined]
    return Annotated[partial, BeforeValidator(lambda value: {} if value is None else value)]


@_section
class StageConfig:
    """One stage of a multi-stage run (e.g. SFT then GRPO); unset keys keep the top-level value."""

    name: str = Field("", description="stage name; empty: '<index>-<algorithm>'")
    algorithm: str | None = Field(None, description="algorithm of this stage")
    max_steps: Int | None = Field(None, description="training steps of this stage", ge=0)
    algo: dict[str, Any] | None = Field(
        None, description="algorithm overrides of this stage (replace the top-level `algo`)"
    )
    data: _overrides_of(DataConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `data` section"
    )
    rollout: _overrides_of(RolloutConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `rollout` section"
    )
    optim: _overrides_of(OptimConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `optim` section"
    )
    eval: _overrides_of(EvalConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `eval` section"
    )


@_section
class TrainConfig:
    """A training run: writes runs/<name>/ (config.yaml, metrics.jsonl, checkpoints/, summary.json)."""

    name: str = Field("demo", description="run name: the run writes <output_dir>/<name>/")
    algorithm: str = Field("hpt", description="algorithm name (see `hpt algorithms`)")
    max_steps: Int = Field(60, description="training steps", ge=0)
    save_every: Int = Field(
        20, description="checkpoint every N steps (and at the end); 0: only at the end", ge=0
    )
    seed: Int = Field(0, description="seed of sampling, data order and initialisation")
    resume: bool = Field(False, description="continue from the newest checkpoint of runs/<name>/")
    overwrite: bool = Field(
        False, description="replace an existing run of the same name (else it is an error)"
    )
    output_dir: str = Field("runs", description="parent folder of runs")
    keep_checkpoints: Int | None = Field(
        2, description="keep the newest K checkpoints; null: keep all", gt=0
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy model")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (peft)")
    data: DataConfig = Field(
        default_factory=DataConfig, description="training data, prompts and length limits"
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="sampling of rollouts"
    )
    algo: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides passed to hpt.get_algorithm (clip_low, clip_high, dual_clip, "
        "aggregation, gate_threshold, gate_upper, shaping_gamma, sft_coef, entropy_coef, kl_coef, "
        "kl_estimator, norm_length)",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser and update")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="multi-process training (torchrun)"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="logging and plots")
    demo: DemoConfig = Field(default_factory=DemoConfig, description="the embedded demo")
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="optional stages run in order, each overriding keys above (e.g. SFT then GRPO)",
    )

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``: where the run writes."""
        return Path(self.output_dir) / self.name

    def resolved_stages(self) -> list[TrainConfig]:
        """The configs of the stages, in order (see :func:`resolve_stages`)."""
        from hpt.train.config.load import resolve_stages

        return [stage for _, stage in resolve_stages(self)]


_TRAIN_CONFIG = TypeAdapter(TrainConfig)
