"""The CPU-fused executor: the whole decoder for a few tokens in one C call (decode steps,
speculative verification, short chunks), and the thresholds measured on this kind of CPU.

PyTorch spends ~10 us dispatching each small op; a decode step of a 30-layer model is ~700 of
them, more time than reading the weights. `FusedDecoder` hands the C kernel (kernels/_cpu.c,
`decoder_forward`) a table of every layer's weight, norm and cache pointers once, then each step
passes only the tokens, their positions and their block tables. Same cache layout and numerics
as the PyTorch path (float32 activations; quantized matrices as in `Linear`), so steps may
alternate between the two. Llama-style blocks (Llama, Mistral, Qwen2, Qwen3) and Gemma 3's (two
more norms, GeGLU); long prefill chunks take the PyTorch executor.

The thresholds below were measured on the 2-core AVX-512 CPU; `tune_layers` hands the layers
theirs (the PyTorch executor's products on the CPU follow them too).
"""

from __future__ import annotations

import math
import os

import torch

from fulmine import kernels
from fulmine.engine.step import StepBatch
from fulmine.executors.base import ModelState
from fulmine.executors.torch_eager import use_torch_threads
from fulmine.layers.linear import Linear
from fulmine.layers.quantized import QuantizedShards, QuantizedWeight
from fulmine.layers.rotary import RotaryEmbedding
from fulmine.models.decoder import DecoderLayer, DecoderModel, SandwichDecoderLayer

# Steps with at most this many tokens run fused; above, the batched GEMMs of the PyTorch path win.
# Measured on the 2-core AVX-512 CPU, embedded model, one prompt, fused vs PyTorch path:
# exact (float32 GEMM): 16 tokens 32 vs 38 ms, 32: 60 vs 129, 64: 124 vs 179, 128: 268 vs 308,
# 256: 539 vs 465; fast (bfloat16 GEMM): 32: 66 vs 94, 48: 100 vs 95, 64: 139 vs 108, 128: 275 vs 166.
FUSED_MAX_TOKENS_EXACT = 128
FUSED_MAX_TOKENS_FAST = 48
# With the interleaved layouts (kernels/interleaved.c) the fast kernels' products keep up with the GEMM
# to 256 rows; the fused attention (per token and head, over the whole context) falls behind deeper
# in. Time to the first token, one prompt prefilled in chunks of 256 (the default budget), fused vs
# PyTorch path, 2-core AVX-512 CPU: embedded model 64 tokens 42-50 vs 119-121 ms, 128: 87-105 vs
# 141-158, 256: 184-213 vs 188-201, 512: 409-442 vs 434; 1024 (fused throughout): 1122 vs 932.
# Qwen2.5-Coder-0.5B Q4_K_M 256: 483-582 vs 562-793, 512: 1047-1233 vs 1136-1569. Gemma 3 270M
# 256: 190-198 vs 182-218, 512: 427-437 vs 415. So a step of up to 256 tokens runs fused while its
# tokens sit in the first 512 positions: a prompt of up to 512 tokens is prefilled with the numerics
# of its decode steps.
FUSED_MAX_TOKENS_SHALLOW = 256
FUSED_SHALLOW_POSITIONS = 512


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


def tune_layers(model: DecoderModel) -> None:
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
    if config.head_dim % 2 or config.hidden_size % 32 or config.intermediate_size % 32:
        return "dimensions the kernel does not tile"
    for layer in model.layers:
        assert isinstance(layer, (DecoderLayer, SandwichDecoderLayer))
        attn, mlp = layer.self_attn, layer.mlp
        if any(_matrix(m) is None for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            return "a matrix is stored in a type the kernel does not read"
    return None


class FusedDecoder:
    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        rotary: RotaryEmbedding,
        rotary_sliding: RotaryEmbedding,
        layer_is_sliding: list[bool],
        block_size: int,
        exact: bool,
    ) -> None:
        config = model.config
        self.model, self.config, self.exact = model, config, exact
        self.max_tokens = FUSED_MAX_TOKENS_EXACT if exact else FUSED_MAX_TOKENS_FAST
        module = kernels.cpu()
        assert module is not None
        self._kernel = module.decoder_forward
        rows = []
        for layer, (k_cache, v_cache), sliding in zip(model.layers, kv_caches, layer_is_sliding):
            assert isinstance(layer, (DecoderLayer, SandwichDecoderLayer))
            attn, mlp = layer.self_attn, layer.mlp
            # the norm before the MLP, and (Gemma 3) the norms of the attention's and the MLP's outputs
            if isinstance(layer, SandwichDecoderLayer):
                pre_mlp = layer.pre_feedforward_layernorm.weight
                attn_out, mlp_out = layer.post_attention_layernorm.weight, layer.post_feedforward_layernorm.weight
            else:
                pre_mlp, attn_out, mlp_out = layer.post_attention_layernorm.weight, None, None
            rope = rotary_sliding if sliding else rotary
            qkv, o, gate_up, down = (_matrix(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
            assert qkv and o and gate_up and down
            rows.append(
                [
                    _pointer(layer.input_layernorm.weight),
                    *[field for shard in qkv for field in shard],
                    _pointer(attn.qkv_proj.bias),
                    _pointer(attn.q_norm.weight if attn.q_norm is not None else None),
                    _pointer(attn.k_norm.weight if attn.k_norm is not None else None),
                    *o[0],
                    _pointer(attn.o_proj.bias),
                    _pointer(pre_mlp),
                    *[field for shard in gate_up for field in shard],
                    *down[0],
                    _pointer(k_cache, (torch.float32, torch.float16)),
                    _pointer(v_cache, (torch.float32, torch.float16)),
                    config.sliding_window if sliding and config.sliding_window else 0,
                    _pointer(rope.cos),
                    _pointer(rope.sin),
                    _pointer(attn_out),
                    _pointer(mlp_out),
                    int(k_cache.dtype == torch.float16),  # else float32
                ]
            )
        assert len(rows[0]) == module.info()["layer_fields"]
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
        )
        self.scale = config.attn_scale if config.attn_scale is not None else 1 / math.sqrt(config.head_dim)

    def __call__(
        self, input_ids: list[int], positions: list[int], seq_index: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size] of tokens at `positions` of sequences `seq_index`.

        tables[s] is sequence s's block table; every token's own key/value is written to the cache
        before any token attends, so a sequence's tokens see each other causally.
        """
        hidden = self.model.embed_tokens(torch.tensor(input_ids, dtype=torch.long)).float()
        if self.config.embed_scale != 1.0:
            hidden = hidden * self.config.embed_scale
        hidden = hidden.contiguous()
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int32)
        seq = torch.tensor(seq_index, dtype=torch.int32)
        self._kernel(
            hidden.data_ptr(),
            len(input_ids),
            len(self.layer_table),
            self.layer_table.data_ptr(),
            self.final_norm.data_ptr(),
            pos.data_ptr(),
            seq.data_ptr(),
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
        if batch.num_tokens <= self.decoder.max_tokens:
            return True
        shallow = not self.decoder.exact and batch.num_tokens <= FUSED_MAX_TOKENS_SHALLOW
        return shallow and max(batch.positions) < FUSED_SHALLOW_POSITIONS

    def forward(self, batch: StepBatch) -> torch.Tensor:
        # One owner for the cores: the matrices run in the C kernels' own pool, so what PyTorch does
        # around them (sampling extras, logprobs) runs on this thread alone, never waking its OpenMP
        # pool to spin against the kernels'.
        use_torch_threads(1)
        tables = [s.block_table for s in batch.seqs]
        return self.decoder(batch.token_ids, batch.positions, batch.seq_index, tables)
