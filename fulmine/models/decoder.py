"""What every decoder-only family's model file builds on: the attention (GQA, RoPE, optional q/k
norm and biases, paged KV cache), the gated MLP, the layer contract and the causal LM around the
layers (embedding, final norm, LM head, loading, tensor parallelism).

A family's file (models/llama.py, models/gemma3.py) defines its layer, how its norms and
sub-blocks join the residual stream, and its GGUF tensor names. Parameter names follow HF's,
except that q/k/v and gate/up are merged (`qkv_proj`, `gate_up_proj`); `load_weight` maps
checkpoint names onto them. Inputs are flat: all tokens of all scheduled requests in one
[num_tokens] vector.
"""

from __future__ import annotations

import torch
from torch import nn

from fulmine import kernels
from fulmine.config import ModelConfig
from fulmine.layers.activation import gelu_tanh_and_mul, silu_and_mul
from fulmine.layers.attention import AttentionMetadata, paged_attention
from fulmine.layers.experts import SparseMoE
from fulmine.layers.linear import Embedding, Linear, MergedLinear
from fulmine.layers.norm import RMSNorm
from fulmine.layers.rotary import apply_rotary
from fulmine.layers.tensor_parallel import TensorParallel
from fulmine.layers.weights import WeightTensor, as_dense

# checkpoint projection name -> (merged module name, shard index)
_MERGED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


_EXPERT_MERGED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
# other checkpoints' names of the same tensors (Mixtral's sparse block and its w1/w3/w2)
_ALIASES = {"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical_name(name: str) -> str:
    """A checkpoint tensor's name in the vocabulary of fulmine's modules (HF's Llama/Qwen names)."""
    if "block_sparse_moe" not in name:
        return name
    return ".".join(_ALIASES.get(part, part) for part in name.split("."))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, config.o_bias)
        # each head's (Qwen3, Gemma 3), or all heads' at once (OLMoE: the norms span q's and k's widths)
        self.qk_norm_whole = config.qk_norm_whole
        q_width, k_width = (q_size, kv_size) if config.qk_norm_whole else (self.head_dim, self.head_dim)
        self.q_norm = RMSNorm(q_width, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(k_width, config.rms_norm_eps) if config.qk_norm else None
        self.clip_qkv = config.clip_qkv
        self.scale = config.attn_scale
        self.tp: TensorParallel | None = None  # tensor parallel: o_proj's partial sums all-reduced

    def forward(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = self.qkv_proj.split(qkv)
        if self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, meta.cos, meta.sin), apply_rotary(k, meta.cos, meta.sin)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        out = self.o_proj(out)
        return out if self.tp is None else self.tp.all_reduce(out)


def make_mlp(config: ModelConfig, layer: int) -> MLP | SparseMoE:
    """Layer `layer`'s MLP: a mixture of experts where the config has them there, else a gated MLP."""
    return SparseMoE(config) if config.is_moe(layer) else MLP(config)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.act_and_mul = gelu_tanh_and_mul if config.hidden_act == "gelu_tanh" else silu_and_mul
        self.tp: TensorParallel | None = None  # tensor parallel: down_proj's partial sums all-reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    """A layer (number `layer` of the model): attention and MLP (or mixture of experts) around the
    residual stream, each family's norms its own. The fused
    CPU decoder reads the norms by role: before attention (`input_layernorm`), before the MLP, and
    of the two sub-blocks' outputs (None where the family has none)."""

    input_layernorm: RMSNorm
    self_attn: Attention
    mlp: MLP | SparseMoE
    pre_mlp_norm: RMSNorm
    attn_out_norm: RMSNorm | None = None
    mlp_out_norm: RMSNorm | None = None

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added); residual None: the first layer."""
        raise NotImplementedError


class CausalLM(nn.Module):
    """Embedding -> layers -> final norm -> LM head. A family's model sets its layer class and the
    names of its layers' tensors in GGUF files (after "blk.N.", HF names after "model.layers.N.")."""

    layer_class: type[DecoderLayer]
    gguf_layer_names: dict[str, str]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        # its rows are the step's sampled positions, as many as the batch has: always the kernel (the
        # layer's default, which the CPU executor's tuning leaves), so a row's logits never depend
        # on what else was sampled with it
        self.tie_weights()
        self.tp: TensorParallel | None = None  # this model is one rank's part (layers/tensor_parallel.py)
        self.full_vocab_size = config.vocab_size

    def set_tensor_parallel(self, tp: TensorParallel, vocab_size: int) -> None:
        """This model holds rank tp.rank's part of a model with `vocab_size` tokens."""
        self.tp, self.full_vocab_size = tp, vocab_size
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.tp = tp

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metas: list[AttentionMetadata],  # one per layer
    ) -> torch.Tensor:
        """Final hidden states, [num_tokens, hidden_size]."""
        if self.tp is None:
            x = self.embed_tokens(input_ids)
        else:
            x = self.tp.embed(self.embed_tokens, input_ids, self.full_vocab_size)
        x = x.to(self.norm.weight.dtype)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        residual: torch.Tensor | None = None
        for layer, kv_cache, meta in zip(self.layers, kv_caches, metas):
            x, residual = layer(x, residual, kv_cache, meta)
        assert residual is not None
        return self.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_sampled, hidden_size] -> [num_sampled, vocab_size] in float32."""
        logits = self.lm_head(hidden).float()
        return logits if self.tp is None else self.tp.gather_logits(logits, self.full_vocab_size)

    def finish_loading(self, quantize: int | None = None, exact: bool = False) -> None:
        """Kept GGUF blocks become quantized weights; `quantize` (a GGML type) quantizes the dense rest.

        The embedding table (and a tied lm_head with it) is quantized to Q8_0 whatever `quantize`
        asks, as llama.cpp keeps its output layer at higher precision. In the fast mode (not `exact`)
        the matrices get their rows interleaved where the kernels have that layout (the LM head where
        that layout reads it faster on this machine, timed at load).
        """
        tied = self.config.tie_word_embeddings
        for module in self.modules():
            if isinstance(module, Linear) and not (tied and module is self.lm_head):
                module.finish_loading()
                is_table = isinstance(module, Embedding) or module is self.lm_head
                if quantize is not None:
                    module.quantize(kernels.Q8_0 if is_table else quantize)
                # a vocabulary table only where interleaving reads it faster here; an untied embedding
                # table, only looked up, stays as stored
                if not exact and (not is_table or module is self.lm_head or tied):
                    module.interleave(if_faster=is_table)
                module.exact = exact
        if tied:
            self.lm_head.quant, self.lm_head.exact = self.embed_tokens.quant, exact

    def keep_blocks(self) -> None:
        """Keep GGUF blocks the kernels read as they are (call before loading)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.keep_blocks = True

    def narrow_weights(self, weight_dtype: torch.dtype) -> None:
        """Store the matrices (linear layers, embedding) in `weight_dtype`; norms and biases keep theirs."""
        for module in self.modules():
            if isinstance(module, (Linear, Embedding)) and not module.full_precision:
                module.weight.data = module.weight.data.to(weight_dtype)

    def fold_norm_offsets(self) -> None:
        """Norms that scale by (offset + w) hold offset + w from now on (Gemma's offset is 1)."""
        if self.config.norm_offset:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.data += self.config.norm_offset

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def weight_slots(self) -> set[tuple[str, int]]:
        """Every (parameter name, shard) a checkpoint must fill."""
        slots: set[tuple[str, int]] = set()
        for module_name, module in self.named_modules():
            num_shards = module.num_shards if isinstance(module, Linear) else 1
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                slots.update((full, shard) for shard in range(num_shards))
        if self.config.tie_word_embeddings:
            slots.discard(("lm_head.weight", 0))
        return slots

    def load_weight(self, name: str, tensor: WeightTensor) -> tuple[str, int] | None:
        """Load one checkpoint tensor given by its HF name (e.g. model.layers.0.self_attn.q_proj.weight).

        Returns the (parameter name, shard) it filled, or None for a tensor that is not needed.
        """
        name = canonical_name(name.removeprefix("model."))
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # tied checkpoints may still carry a copy
        if name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints store RoPE tables; fulmine computes its own
        parts = name.split(".")
        kind = parts[-1]  # weight or bias
        if len(parts) >= 4 and parts[-4] == "experts":  # layers.N.mlp.experts.E.gate_proj.weight
            expert, projection = int(parts[-3]), parts[-2]
            module_name = ".".join([*parts[:-3], _EXPERT_MERGED[projection]])
            module = self.get_submodule(module_name)
            assert isinstance(module, MergedLinear)
            shard = {"gate_proj": 2 * expert, "up_proj": 2 * expert + 1, "down_proj": expert}[projection]
            if shard >= module.num_shards:
                raise ValueError(f"expert {expert} beyond the config's {module.num_shards} shards")
            module.load_shard(tensor, shard, is_bias=kind == "bias")
            return f"{module_name}.{kind}", shard
        merged = _MERGED.get(parts[-2]) if len(parts) >= 2 else None
        if merged is not None:
            module_name = ".".join([*parts[:-2], merged[0]])
            module = self.get_submodule(module_name)
            assert isinstance(module, MergedLinear)
            module.load_shard(tensor, merged[1], is_bias=kind == "bias")
            return f"{module_name}.{kind}", merged[1]
        module = self.get_submodule(".".join(parts[:-1]))
        if isinstance(module, Linear):  # Embedding included
            module.load_shard(tensor, is_bias=kind == "bias")
        else:
            param = getattr(module, kind)
            param.data.copy_(as_dense(tensor, param.dtype).reshape(param.shape))
        return name, 0
