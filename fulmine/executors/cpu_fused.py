"""The CPU-fused executor: the whole decoder in one C call per step (decode steps, speculative
verification, prompt chunks), and the thresholds measured on this kind of CPU.

PyTorch spends ~10 us dispatching each small op; a decode step of a 30-layer model is ~700 of
them, more time than reading the weights. `FusedDecoder` hands the C kernel (kernels/_cpu.c,
`decoder_forward`) a table of every layer's weight, norm and cache pointers once, then each step
passes only the tokens, their positions and their block tables. Same cache layout as the PyTorch path,
so steps may alternate between the two. Llama-style blocks (Llama, Mistral, Qwen2, Qwen3; with experts
for the MLP: Mixtral, Qwen3-MoE, OLMoE) and Gemma 3's (two more norms, GeGLU). In the fast mode it
takes every step (one numerics per row, whatever the batch); in the exact mode, long prefill chunks
take the PyTorch executor.

The thresholds below were measured on the 2-core AVX-512 CPU; `tune_layers` hands the layers
theirs (the PyTorch executor's products on the CPU follow them too).
"""

from __future__ import annotations

import math
import os

import torch

from fulmine import kernels
from fulmine.executors.base import ModelState
from fulmine.executors.step import StepBatch
from fulmine.executors.torch_eager import use_torch_threads
from fulmine.layers.experts import SparseMoE
from fulmine.layers.linear import Linear
from fulmine.layers.quantized import QuantizedShards, QuantizedWeight
from fulmine.layers.rotary import RotaryEmbedding
from fulmine.models.decoder import MLP, CausalLM, DecoderLayer

# In the exact mode (float32 activations) steps of at most this many tokens run fused; above, the
# float32 GEMMs of the PyTorch path win. Embedded model, one prompt, fused vs PyTorch path, 2-core
# AVX-512 CPU: 16 tokens 32 vs 38 ms, 32: 60 vs 129, 64: 124 vs 179, 128: 268 vs 308, 256: 539 vs 465.
FUSED_MAX_TOKENS_EXACT = 128
# In the fast mode every step runs fused, in pieces of at most this many tokens (pieces in order: a
# later token attends to an earlier piece's keys, written by then). With the interleaved layouts
# (kernels/interleaved.c) the int8 kernels keep up with dequantize + bfloat16 GEMM at any row count,
# and the fused attention (kernels/attention.c) with PyTorch's. Time to the first token, one prompt
# prefilled in chunks of 256 (the default budget), fused vs PyTorch path, same runs, 2-core AVX-512 CPU
# (`python -m bench.prefill --path fused|torch`):
# embedded model 512 tokens 300-312 vs 379-407 ms, 1024: 723-766 vs 788-887, 2048: 1927-2025 vs
# 2185-2196, 4096: 6391-6547 vs 5751-6009 (its only loss); Qwen2.5-Coder-0.5B Q4_K_M 512: 848-870 vs
# 1029-1043, 2048: 4348-4441 vs 4867-4877, 4096: 11790-11890 vs 11463-11822; Gemma 3 270M 1024:
# 676-713 vs 842-860, 4096: 3516-3540 vs 5227-5606. In chunks of 1024: embedded 1024 tokens 815-847
# vs 1784-1881 ms, 2048: 2198-2301 vs 2986-3043. So a decode row, a prefill row, a verified draft and a
# prefix-cache resume always compute the same bits (batch invariance), at no cost.
FUSED_PIECE_TOKENS = 1024


def _bf16_tiles() -> bool:
    """Whether torch's bfloat16 GEMM runs on AMX tiles here (Intel Sapphire Rapids and later)."""
    if "AMX" not in os.environ.get("ONEDNN_MAX_CPU_ISA", "AMX").upper():
        return False  # oneDNN told not to use them
    try:
        return bool(torch._C._cpu._get_cpu_capability().get("amx_bf16"))
    except (AttributeError, RuntimeError):
        return False


# Above this many rows a quantized product dequantizes the weight for the GEMM (bfloat16 in the fast
# mode, float32 when exact); up to it the C kernel multiplies the blocks as they are. `python -m
# bench.kernels --gguf qwen2.5-coder-1.5b-instruct-q4_k_m.gguf` (8960x1536 Q4_K, 2 threads), int8
# kernel vs dequantize + bf16 GEMM at 32 / 64 / 256 rows: with AMX tiles 4.1 / 7.1 / 33.3 ms vs
# 4.4 / 4.2 / 7.2; without them (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, as on AMD Zen 4) 3.4 / 7.4 /
# 27.5 vs 10.3 / 12.7 / 37.4, and with no bf16 instructions either 28.4 vs 99.8 at 256. So the
# kernel takes every row count unless the GEMM has AMX (then a prefill row's numerics differ from a
# decode row's: the bfloat16 rounding of activations and weights instead of int8 activations).
KERNEL_MAX_ROWS = 32 if _bf16_tiles() else 1 << 30
# The exact kernel (float32 activations) against the float32 GEMM: 616 vs 683 us at 32 rows (1536x576
# Q4_1), 133 vs 32-42 ms at 256 rows (8960x1536 Q4_K): the GEMM wins past 32 with or without AMX.
EXACT_KERNEL_MAX_ROWS = 32
# Up to this many rows, a float16-weight linear runs in float16. Whole decode steps of the embedded
# model: batch 8 decodes at 40 tok/s with the threshold at 4 (each step upcasts every weight) and 109
# tok/s at 8; batch 16 at 71 tok/s with 8 and 113 tok/s with 16. Past ~16 rows the upcast float32 GEMM wins.
NARROW_GEMV_MAX_ROWS = 16


def tune_layers(model: CausalLM) -> None:
    """Give every linear layer (but the lm_head, always the kernel) this CPU's thresholds."""
    for module in model.modules():
        if isinstance(module, Linear) and module is not model.lm_head:
            module.max_kernel_rows = KERNEL_MAX_ROWS
            module.max_exact_kernel_rows = EXACT_KERNEL_MAX_ROWS
            module.narrow_gemv_max_rows = NARROW_GEMV_MAX_ROWS


_DENSE_TYPES = {torch.float32: kernels.F32, torch.float16: kernels.F16}


def _matrix(linear: Linear) -> list[tuple[int, int]] | None:
    """Per shard (q/k/v, gate/up; one for a plain layer): (pointer, GGML type) of its rows as the
    kernel reads them, or None if it cannot."""
    sizes = linear.out_sizes
    if isinstance(linear.quant, QuantizedShards):
        return [(part.raw.data_ptr(), part.qtype) for part in linear.quant.parts]
    if isinstance(linear.quant, QuantizedWeight):
        base, row_bytes, qtype = linear.quant.raw.data_ptr(), linear.quant.raw.shape[1], linear.quant.qtype
    else:
        weight = linear.weight
        if weight.dtype not in _DENSE_TYPES or not weight.is_contiguous():
            return None
        base, row_bytes, qtype = weight.data_ptr(), weight.shape[1] * weight.element_size(), _DENSE_TYPES[weight.dtype]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(base + offset * row_bytes, qtype) for offset in offsets]


def _shards(names: tuple[str, ...], parts: list[tuple[int, int]]) -> dict[str, int]:
    """A merged matrix's shards (q, k, v) as the row's fields: each one's pointer and its type."""
    assert len(parts) == len(names)
    fields = {}
    for name, (pointer, qtype) in zip(names, parts):
        fields[name], fields[f"{name}_type"] = pointer, qtype
    return fields


def _pointer(tensor: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> int:
    if tensor is None:
        return 0
    assert tensor.dtype in dtypes and tensor.is_contiguous()
    return tensor.data_ptr()


def unsupported_reason(state: ModelState) -> str | None:
    """Why this model cannot run fused here, or None if it can."""
    model = state.model
    config = model.config
    if kernels.cpu() is None:
        return "the C kernels are not built"
    if state.device.type != "cpu" or state.dtype != torch.float32:
        return "fused steps run on the CPU with float32 activations"
    if state.kv_caches[0][0].dtype not in (torch.float32, torch.float16):
        return "fused steps read float32 or float16 KV caches"
    if config.clip_qkv is not None:
        return "q/k/v clipping (clip_qkv) runs in the PyTorch executor"
    if (
        config.head_dim % 2
        or config.hidden_size % 32
        or config.intermediate_size % 32
        or config.moe_intermediate_size % 32
    ):
        return "dimensions the kernel does not tile"
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        attn = layer.self_attn
        if any(_matrix(m) is None for m in (attn.qkv_proj, attn.o_proj)) or _mlp_fields(layer.mlp) is None:
            return "a matrix is stored in a type (or experts in a layout) the kernel does not read"
    return None


def _mlp_fields(mlp: MLP | SparseMoE) -> dict[str, int] | None:
    """A layer's MLP as the row's fields: its gate, up and down; for a mixture of experts, expert 0's,
    the strides to the next expert's (every expert's in one type, evenly spaced) and the router."""
    if isinstance(mlp, MLP):
        gate_up, down = _matrix(mlp.gate_up_proj), _matrix(mlp.down_proj)
        if gate_up is None or down is None:
            return None
        return dict(**_shards(("gate", "up"), gate_up), **_shards(("down",), down), router=0, router_type=0,
                    gate_up_stride=0, down_stride=0)  # fmt: skip
    gate_up, down, router = _matrix(mlp.experts.gate_up_proj), _matrix(mlp.experts.down_proj), _matrix(mlp.gate)
    if gate_up is None or down is None or router is None or len(router) != 1:
        return None
    gate_up_stride = 2 * (gate_up[1][0] - gate_up[0][0])  # an expert's gate rows, then its up rows
    down_stride = down[1][0] - down[0][0] if len(down) > 1 else 0
    for parts, stride in ((gate_up[::2], gate_up_stride), (gate_up[1::2], gate_up_stride), (down, down_stride)):
        if any(qtype != parts[0][1] or pointer != parts[0][0] + i * stride for i, (pointer, qtype) in enumerate(parts)):
            return None
    return dict(
        **_shards(("gate", "up"), gate_up[:2]), **_shards(("down",), down[:1]),
        router=router[0][0], router_type=router[0][1], gate_up_stride=gate_up_stride, down_stride=down_stride,
    )  # fmt: skip


class FusedDecoder:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        rotary: RotaryEmbedding,
        rotary_sliding: RotaryEmbedding,
        layer_is_sliding: list[bool],
        block_size: int,
        exact: bool,
    ) -> None:
        config = model.config
        self.model, self.config, self.exact = model, config, exact
        self.max_tokens = FUSED_MAX_TOKENS_EXACT if exact else None  # None: any step
        module = kernels.cpu()
        assert module is not None
        self._kernel = module.decoder_forward
        names = [name.lower() for name in module.info()["layer_fields"]]  # the C row's order
        rows = []
        for layer, (k_cache, v_cache), sliding in zip(model.layers, kv_caches, layer_is_sliding):
            assert isinstance(layer, DecoderLayer)
            attn = layer.self_attn
            rope = rotary_sliding if sliding else rotary
            qkv, o, mlp = _matrix(attn.qkv_proj), _matrix(attn.o_proj), _mlp_fields(layer.mlp)
            assert qkv and o and mlp
            cache_types = (torch.float32, torch.float16)
            row = dict(
                in_norm=_pointer(layer.input_layernorm.weight),
                **_shards(("q", "k", "v"), qkv),
                qkv_bias=_pointer(attn.qkv_proj.bias),
                q_norm=_pointer(attn.q_norm.weight if attn.q_norm is not None else None),
                k_norm=_pointer(attn.k_norm.weight if attn.k_norm is not None else None),
                **_shards(("o",), o),
                o_bias=_pointer(attn.o_proj.bias),
                pre_mlp_norm=_pointer(layer.pre_mlp_norm.weight),
                **mlp,
                k_cache=_pointer(k_cache, cache_types),
                v_cache=_pointer(v_cache, cache_types),
                window=config.sliding_window if sliding and config.sliding_window else 0,
                cos=_pointer(rope.cos),
                sin=_pointer(rope.sin),
                # sandwich norms (Gemma 3): of the attention's and the MLP's outputs, before the residual
                attn_out_norm=_pointer(layer.attn_out_norm.weight if layer.attn_out_norm is not None else None),
                ffn_out_norm=_pointer(layer.mlp_out_norm.weight if layer.mlp_out_norm is not None else None),
                kv_half=int(k_cache.dtype == torch.float16),  # else float32
                qk_norm_whole=int(config.qk_norm_whole),
            )
            if sorted(row) != sorted(names):
                raise RuntimeError(f"the fused decoder's layer fields {names} differ from the row's {sorted(row)}")
            rows.append([row[name] for name in names])
        self.layer_table = torch.tensor(rows, dtype=torch.int64)  # the pointers stay valid: the model owns them
        self.final_norm = model.norm.weight
        self.dims = (
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.intermediate_size,
            block_size,
            int(config.hidden_act == "gelu_tanh"),
            config.num_experts,
            config.num_experts_per_tok,
            int(config.norm_topk_prob),
            config.moe_intermediate_size,
        )
        self.scale = config.attn_scale if config.attn_scale is not None else 1 / math.sqrt(config.head_dim)

    def __call__(
        self, input_ids: list[int], positions: list[int], seq_index: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size] of tokens at `positions` of sequences `seq_index`.

        tables[s] is sequence s's block table; every token's own key/value is written to the cache
        before any token attends, so a sequence's tokens see each other causally. A sequence's tokens
        come in order of position, so pieces of FUSED_PIECE_TOKENS run one after another compute what
        one call would.
        """
        hidden = self.model.embed_tokens(torch.tensor(input_ids, dtype=torch.long)).float()
        if self.config.embed_scale != 1.0:
            hidden = hidden * self.config.embed_scale
        hidden = hidden.contiguous()
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int32)
        seq = torch.tensor(seq_index, dtype=torch.int32)
        for start in range(0, len(input_ids), FUSED_PIECE_TOKENS):
            end = min(start + FUSED_PIECE_TOKENS, len(input_ids))
            self._kernel(
                hidden[start:end].data_ptr(),
                end - start,
                len(self.layer_table),
                self.layer_table.data_ptr(),
                self.final_norm.data_ptr(),
                pos[start:end].data_ptr(),
                seq[start:end].data_ptr(),
                table.data_ptr(),
                width,
                self.dims,
                self.config.rms_norm_eps,
                self.scale,
                self.exact,
            )
        return hidden


class CpuFusedExecutor:
    name = "cpu-fused"

    def __init__(self, state: ModelState) -> None:
        self.decoder = FusedDecoder(
            state.model,
            state.kv_caches,
            state.rotary,
            state.rotary_sliding,
            state.layer_is_sliding,
            state.block_size,
            state.exact_kernels,
        )

    def accepts(self, batch: StepBatch) -> bool:
        limit = self.decoder.max_tokens
        return limit is None or batch.num_tokens <= limit

    def forward(self, batch: StepBatch) -> torch.Tensor:
        # One owner for the cores: the matrices run in the C kernels' own pool, so what PyTorch does
        # around them (sampling extras, logprobs) runs on this thread alone, never waking its OpenMP
        # pool to spin against the kernels'.
        use_torch_threads(1)
        tables = [s.block_table for s in batch.seqs]
        return self.decoder(batch.token_ids, batch.positions, batch.seq_index, tables)
