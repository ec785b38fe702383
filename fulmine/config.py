"""Configuration: frozen dataclasses, validated on construction, with errors that say what to change.

`ModelConfig` describes the network (read from a HF config.json or GGUF metadata); `EngineConfig`
describes how fulmine runs it (memory, batching). CLI flags are derived from `EngineConfig` fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANTIZATIONS = ("auto", "none", "int8", "int4")
_EXECUTORS = ("auto", "cuda-graph", "cpu-fused", "torch", "graph-eager")  # fulmine/executors/


def _opt(default: Any, help: str) -> Any:
    """A config field with a default and the help text its CLI flag shows."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration or input the user can fix; the message says how. `param`: the request field at
    fault, when one is (the server's 400 names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF architecture name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_bias: bool = False  # bias on the attention output projection (Llama attention_bias=True)
    qk_norm: bool = False  # RMSNorm on each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    # Per layer "full" or "sliding" (Gemma 3 alternates them); empty: every layer uses sliding_window.
    layer_types: tuple[str, ...] = ()
    rope_theta_sliding: float | None = None  # RoPE base of sliding layers, if it differs (Gemma 3)
    # Gemma-style variations of the Llama block (defaults are Llama's)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight); folded into the weight at load
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    hidden_act: str = "silu"  # gated MLP activation: silu or gelu_tanh
    attn_scale: float | None = None  # softmax scale (default 1/sqrt(head_dim))
    qk_norm_whole: bool = False  # the q/k norms span all heads at once, not each head (OLMoE)
    clip_qkv: float | None = None  # q, k and v clamped to [-clip, clip] after their projections (OLMoE)
    # Mixture of experts (num_experts > 0): a layer's MLP is num_experts gated MLPs of
    # moe_intermediate_size, each token through the num_experts_per_tok its router scores highest,
    # their outputs summed weighted by the router's softmax over all experts, renormalized over the
    # chosen ones when norm_topk_prob; dense_layers keep a plain MLP of intermediate_size
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def is_moe(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding"

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ConfigError(f"hidden activation {self.hidden_act!r} is not supported (silu, gelu_tanh)")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be from 1 to num_experts ({self.num_experts})"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError("a mixture-of-experts model needs moe_intermediate_size > 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )


# reasoning effort -> thinking budget in tokens (None: the model's own length); `none` also turns the
# model's own switch off where its template has one (Qwen3's enable_thinking)
EFFORTS: dict[str, int | None] = {"none": 0, "minimal": 128, "low": 512, "medium": 2048, "high": None}


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Every field is also a CLI flag (see cli.py), its help the metadata."""

    max_model_len: int | None = _opt(None, "context window (default: the model's)")
    max_num_seqs: int = _opt(64, "requests running at once")
    max_num_batched_tokens: int = _opt(
        256,
        "per-step token budget: longer prompts are prefilled in chunks of at most this, so a running "
        "stream waits at most one such step between tokens (256 costs nothing measurable in TTFT here)",
    )
    max_itl_ms: float = _opt(
        100.0,
        "while streams are decoding, prompts beside them are prefilled in chunks sized (by the step cost "
        "model, fitted on measured steps) so that each step, and so each stream's gap between tokens, stays "
        "under this; 0: off (chunks of max_num_batched_tokens)",
    )
    slo_ttft_ms: float = _opt(
        0.0,
        "default time-to-first-token target of every request (a request's own `slo` overrides it): a "
        "request predicted to miss it is refused at once (HTTP 429 with Retry-After); 0: none",
    )
    slo_itl_ms: float = _opt(
        0.0,
        "default inter-token target of every request (a request's own `slo` overrides it): prompts beside "
        "its stream are chunked to keep it, and a request it cannot be met for is refused; 0: none",
    )
    block_size: int = _opt(16, "tokens per KV cache block")
    kv_cache_memory_gb: float | None = _opt(
        None,
        "memory budget for the KV cache; default 1 GB, raised to one full context when that needs more "
        "(on the CPU pages become resident only as the cache fills)",
    )
    kv_cache_dtype: str = _opt(
        "auto",
        "keys and values in the cache: auto is float16 on the CPU (half the bytes each decode step reads "
        "at long context, and twice the tokens in the same memory; llama.cpp's default too) unless full "
        "precision was asked for (--weight-dtype float32 or --exact-kernels), else the activation dtype; or "
        "float32, float16, bfloat16",
    )
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of earlier requests with the same prefix")
    device: str = _opt("auto", "auto picks cuda when available, else cpu")
    dtype: str = _opt("auto", "activations: auto is float32 on cpu, bfloat16 on cuda")
    weight_dtype: str = _opt("auto", "matrices: auto is float16 on cpu (decode reads half the bytes), else dtype")
    quantization: str = _opt(
        "auto",
        "weights in memory: auto keeps a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are (when the C kernels "
        "are built); none dequantizes them; int8 / int4 quantize every matrix (Q8_0 / Q4_1) on load",
    )
    exact_kernels: bool = _opt(
        False,
        "quantized matrices multiply float32 activations (matches a dequantized reference to rounding; "
        "slower) instead of int8-quantized ones as llama.cpp does",
    )
    executor: str = _opt(
        "auto",
        "how steps run: auto takes every specialized executor the model and device support (cuda-graph "
        "decode on CUDA, cpu-fused on the CPU) with torch for the rest; cuda-graph, cpu-fused or torch "
        "insist on one; graph-eager runs cuda-graph's fixed-shape decode steps without capturing (debugging)",
    )
    speculative: str = _opt(
        "ngram",
        "speculative decoding: ngram drafts from the request's own text (prompt lookup), draft from "
        "--draft-model, off disables it",
    )
    draft_model: str | None = _opt(None, "smaller model sharing the tokenizer, for --speculative draft")
    num_speculative_tokens: int = _opt(4, "most tokens drafted per step when speculating")
    grammar_fast_forward: bool = _opt(
        True,
        "tokens a structured output's grammar forces are fed as drafts and verified in one forward "
        "(the same tokens, fewer steps); off samples them one step each",
    )
    chat_template: str | None = _opt(
        None, "a Jinja chat template file to use instead of the model's (its tools and thinking switch included)"
    )
    reasoning_parser: str = _opt(
        "auto",
        "how the model's thinking is told from its answer: think (<think> tags), none, or auto (think where the "
        "chat template writes the tags)",
    )
    num_threads: int | None = _opt(None, "torch intra-op threads on CPU (default: all cores)")
    tensor_parallel_size: int = _opt(
        1,
        "split the model across this many processes (tensor parallel on torch.distributed, gloo on the CPU; "
        "its heads, KV heads and MLP divided among them, the threads too); a correctness path on one CPU",
    )
    nnodes: int = _opt(1, "machines the tensor-parallel ranks span (each hosts tensor_parallel_size / nnodes)")
    node_rank: int = _opt(0, "this machine's index among them: 0 serves the API, the others run headless")
    master_addr: str = _opt("127.0.0.1", "the head node's address, where the ranks meet")
    master_port: int = _opt(0, "the head node's port for the ranks (0: a free one, single machine only)")
    distributed_backend: str = _opt(
        "mp",
        "how the tensor-parallel ranks start: mp (processes on this machine, or by hand on each with --node-rank) "
        "or ray (Ray actors placed over the Ray cluster at RAY_ADDRESS, a local one if none)",
    )
    seed: int = _opt(0, "seed for requests that do not bring their own")

    def __post_init__(self) -> None:
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_itl_ms >= 0, "max_itl_ms must be >= 0"),
            (self.slo_ttft_ms >= 0 and self.slo_itl_ms >= 0, "slo_ttft_ms and slo_itl_ms must be >= 0"),
            (
                self.kv_cache_dtype in ("auto", "float32", "float16", "bfloat16"),
                "kv_cache_dtype must be auto, float32, float16 or bfloat16",
            ),
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0, "kv_cache_memory_gb must be > 0"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1"),
            (self.dtype in _DTYPES, f"dtype must be one of {', '.join(_DTYPES)}"),
            (self.weight_dtype in _DTYPES, f"weight_dtype must be one of {', '.join(_DTYPES)}"),
            (self.quantization in _QUANTIZATIONS, f"quantization must be one of {', '.join(_QUANTIZATIONS)}"),
            (self.executor in _EXECUTORS, f"executor must be one of {', '.join(_EXECUTORS)}"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            (
                self.nnodes >= 1 and self.tensor_parallel_size % self.nnodes == 0,
                "nnodes must divide tensor_parallel_size (each node hosts as many ranks)",
            ),
            (0 <= self.node_rank < self.nnodes, "node_rank must be in [0, nnodes)"),
            (self.distributed_backend in ("mp", "ray"), "distributed_backend: mp or ray"),
            (self.distributed_backend == "mp" or self.nnodes == 1, "the ray backend places the ranks: no --nnodes"),
            (self.nnodes == 1 or self.master_port > 0, "several nodes need --master-port (the head's, agreed)"),
            (self.speculative in ("ngram", "draft", "off"), "speculative must be ngram, draft or off"),
            (
                (self.speculative == "draft") == (self.draft_model is not None),
                "--draft-model goes with --speculative draft",
            ),
            (1 <= self.num_speculative_tokens <= 16, "num_speculative_tokens must be in [1, 16]"),
            (self.reasoning_parser in ("auto", "none", "think"), "reasoning_parser: auto, none or think"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class ServerConfig:
    """How `fulmine serve` listens. Every field is also a CLI flag, its help the metadata."""

    host: str = _opt("127.0.0.1", "address to bind (loopback unless told otherwise)")
    port: int = _opt(8000, "port to listen on")
    api_key: tuple[str, ...] = _opt((), "bearer token the API accepts (repeatable; also FULMINE_API_KEY=k1,k2)")
    served_model_name: tuple[str, ...] = _opt((), "name clients ask for (repeatable; default: the model's)")
    max_queue: int = _opt(256, "requests that may wait beyond the running batch; past it, 429")
    request_timeout_s: float = _opt(600.0, "a request running longer is aborted (408)")
    max_body_mb: float = _opt(8.0, "larger request bodies get 413")
    body_timeout_s: float = _opt(30.0, "a request body must arrive whole within this (408 otherwise)")
    max_n: int = _opt(16, "largest n (choices per request)")
    log_prompts: bool = _opt(False, "log prompts (they are not logged otherwise)")
    drain_timeout_s: float = _opt(30.0, "on SIGTERM, requests in flight may finish for this long; then they end")
    max_engine_restarts: int = _opt(3, "engine failures (in 10 minutes) met by a reload; one more exits non-zero")
    cpu_watts_per_core: float = _opt(
        10.0,
        "power of one busy CPU core, for the energy estimate where no counter is readable (RAPL, NVML); "
        "the estimate is labelled as one in /metrics and fulmine bench",
    )
    replicas: int = _opt(
        0, "engines as Ray Serve replicas behind this API, routed by prefix-cache hits (0: one engine in-process)"
    )
    max_replicas: int = _opt(0, "autoscale replicas from --replicas up to this many on queue depth (0: fixed)")
    ray_address: str = _opt("", "an existing Ray cluster to place replicas on (default: a local one is started)")
    routing: str = _opt("prefix", "prefix: a replica by its cached prefix of the prompt, unless loaded; or round_robin")
    reasoning_effort: str = _opt(
        "",
        "a reasoning model's effort when a request names none: none, minimal, low, medium, high "
        "(default: the model's own, no budget)",
    )
    reasoning_budget: int | None = _opt(
        None, "most thinking tokens any request may spend (the smaller of this and its own budget applies)"
    )

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port must be in [0, 65535]"),
            (self.replicas >= 0, "replicas must be >= 0"),
            (self.max_replicas == 0 or self.max_replicas >= max(self.replicas, 1), "max_replicas must be >= replicas"),
            (self.routing in ("prefix", "round_robin"), "routing: prefix or round_robin"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
            (self.max_body_mb > 0, "max_body_mb must be > 0"),
            (self.max_n >= 1, "max_n must be >= 1"),
            (self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0"),
            (self.max_engine_restarts >= 0, "max_engine_restarts must be >= 0"),
            (self.cpu_watts_per_core > 0, "cpu_watts_per_core must be > 0"),
            (self.reasoning_effort in ("", *EFFORTS), f"reasoning_effort: one of {', '.join(EFFORTS)}"),
            (self.reasoning_budget is None or self.reasoning_budget >= 0, "reasoning_budget must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
