"""GGUF files nobody ships here, written in llama.cpp's tensor names and metadata so that llama.cpp
loads them too: a tiny HF model converted (the tests' second reference: the same weights in
transformers, fulmine and llama.cpp), and mixture-of-experts models at real shapes with random
weights (decode and prefill speed do not depend on the weights' values).

    python -m bench.synthetic_gguf --from-hf DIR --arch qwen3moe --qtype Q8_0 --out FILE
    python -m bench.synthetic_gguf --shape qwen3-30b-a3b [--layers 16] --out FILE

A real shape's file takes its vocabulary (tokens, merges, template) from a real GGUF of the same
tokenizer (--vocab, default Qwen2.5-Coder-0.5B's from scripts/fetch_models.py: Qwen3's vocabulary
is Qwen2.5's plus added tokens) and writes tensor by tensor, so memory stays at one tensor.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from safetensors.numpy import load_file

from fulmine.models.decoder import canonical_name
from fulmine.models.llama import GGUF_LAYER_NAMES
from fulmine.models.loader import GGUF_GLOBAL_NAMES, GGUF_STACKED_EXPERTS

# HF layer tensor (after "model.layers.N.", Mixtral's names made canonical) -> llama.cpp's (after "blk.N."):
# the loader's maps, inverted
_LAYER = {f"{hf}.weight": f"{name}.weight" for name, hf in GGUF_LAYER_NAMES.items()}
_EXPERT = {hf: name for name, hf in GGUF_STACKED_EXPERTS.items()}
_GLOBAL = {hf.removeprefix("model."): name for name, hf in GGUF_GLOBAL_NAMES.items()}


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows in llama.cpp's interleaved order (what its Llama converter does)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(hf_dir: Path, arch: str, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """A HF checkpoint's tensors under llama.cpp's names, each layer's experts stacked [E, rows, cols]."""
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    for name, value in tensors.items():
        name = canonical_name(name.removeprefix("model."))
        if name in _GLOBAL:
            yield _GLOBAL[name], value
            continue
        parts = name.split(".")
        layer, rest = parts[1], ".".join(parts[2:])
        if "experts" in parts:
            expert, projection = int(parts[-3]), parts[-2]
            experts.setdefault((layer, _EXPERT[projection]), {})[expert] = value
            continue
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            value = _permute(value, heads if "q_proj" in rest else kv_heads)
        yield f"blk.{layer}.{_LAYER[rest]}", value
    for (layer, kind), by_expert in experts.items():
        yield f"blk.{layer}.{kind}.weight", np.stack([by_expert[e] for e in range(len(by_expert))])


def _tokenizer(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's gpt2 tokenizer metadata."""
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = {t["content"]: t["id"] for t in data["added_tokens"]}
    vocab.update(special)
    tokens = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    for key, add in (("eos_token", writer.add_eos_token_id), ("bos_token", writer.add_bos_token_id)):
        if config.get(key) in vocab:
            add(vocab[config[key]])
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def write_from_hf(hf_dir: Path, out: Path, arch: str, qtype: str = "F32") -> Path:
    """Convert a (tiny) HF model directory to a GGUF file of llama.cpp architecture `arch` (llama for
    Mixtral, qwen3moe, olmoe, ...), its matrices in `qtype` (F32, F16, Q8_0, Q4_0, ...; norms, router
    and matrices whose rows are not whole blocks stay F32)."""
    config = json.loads((hf_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    num_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    if num_experts:
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config.get("moe_intermediate_size") or config["intermediate_size"])
    _tokenizer(writer, hf_dir)
    quant = GGMLQuantizationType[qtype]
    for name, value in _hf_tensors(hf_dir, arch, config):
        value = value.astype(np.float32)
        is_matrix = value.ndim >= 2 and "ffn_gate_inp" not in name
        block = gguf.GGML_QUANT_SIZES[quant][0]
        if is_matrix and quant == GGMLQuantizationType.F16:
            writer.add_tensor(name, value.astype(np.float16))
        elif is_matrix and quant != GGMLQuantizationType.F32 and value.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(value, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# real shapes (from the models' config.json), with the block types of their Q4_K_M files
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(
        arch="qwen3moe", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=6144,
        experts=128, experts_used=8, expert_intermediate=768, vocab=151936, rope_theta=1e6, context=40960,
    ),
}  # fmt: skip

_Q = GGMLQuantizationType


def _random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Random blocks of `qtype` for a tensor of `shape` (rows first): random quants with float16 scales
    chosen so the values are zero-mean with a standard deviation near 0.02, as a trained matrix's are
    (random scale bytes could be inf or NaN; large or biased values make every token's hidden state
    alike, and then a router sends every token to the same experts)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    # (byte offset, scale) per float16 field: Q4_K's d and dmin (6-bit scales and mins, 4-bit quants:
    # dmin = 7.5 d centres them), Q6_K's d (int8 scales, 6-bit quants less 32), Q8_0's d (int8 quants)
    fields = {_Q.Q4_K: ((0, 1.4e-4), (2, 1.05e-3)), _Q.Q6_K: ((208, 1.5e-5),), _Q.Q8_0: ((0, 2.7e-4),)}[qtype]
    for at, scale in fields:
        value = np.full(raw.shape[:2], scale, dtype=np.float16)
        raw[:, :, at : at + 2] = value.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(*shape[:-1], cols // block * size)


def _shape_tensors(spec: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """Every tensor of a real shape: name, shape (rows first) and block type (Q4_K_M's choices)."""
    h, d, e, ie = spec["hidden"], spec["head_dim"], spec["experts"], spec["expert_intermediate"]
    yield "token_embd.weight", (spec["vocab"], h), _Q.Q4_K
    yield "output_norm.weight", (h,), _Q.F32
    yield "output.weight", (spec["vocab"], h), _Q.Q6_K
    for layer in range(spec["layers"]):
        down = _Q.Q6_K if layer % 2 else _Q.Q4_K  # Q4_K_M keeps half the down projections in Q6_K
        blk = f"blk.{layer}."
        yield blk + "attn_norm.weight", (h,), _Q.F32
        yield blk + "attn_q.weight", (spec["heads"] * d, h), _Q.Q4_K
        yield blk + "attn_k.weight", (spec["kv_heads"] * d, h), _Q.Q4_K
        yield blk + "attn_v.weight", (spec["kv_heads"] * d, h), down
        yield blk + "attn_output.weight", (h, spec["heads"] * d), _Q.Q4_K
        yield blk + "attn_q_norm.weight", (d,), _Q.F32
        yield blk + "attn_k_norm.weight", (d,), _Q.F32
        yield blk + "ffn_norm.weight", (h,), _Q.F32
        yield blk + "ffn_gate_inp.weight", (e, h), _Q.F32
        yield blk + "ffn_gate_exps.weight", (e, ie, h), _Q.Q4_K
        yield blk + "ffn_up_exps.weight", (e, ie, h), _Q.Q4_K
        yield blk + "ffn_down_exps.weight", (e, h, ie), down


def _copy_vocabulary(writer: gguf.GGUFWriter, vocab_file: Path, size: int) -> None:
    """A real GGUF file's tokenizer, padded with unused tokens to the shape's vocabulary size."""
    from fulmine.models.gguf_file import GGUFFile

    meta = GGUFFile(vocab_file).metadata
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    tokens += [f"[PAD{i}]" for i in range(size - len(tokens))]
    types += [5] * (size - len(types))  # unused
    writer.add_tokenizer_model(str(meta["tokenizer.ggml.model"]))
    writer.add_tokenizer_pre(str(meta.get("tokenizer.ggml.pre", "default")))
    writer.add_token_list(tokens[:size])
    writer.add_token_types(types[:size])
    writer.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    writer.add_eos_token_id(int(meta["tokenizer.ggml.eos_token_id"]))
    if "tokenizer.ggml.bos_token_id" in meta:
        writer.add_bos_token_id(int(meta["tokenizer.ggml.bos_token_id"]))
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(str(meta["tokenizer.chat_template"]))


def write_shape(name: str, out: Path, vocab_file: Path, layers: int | None = None, seed: int = 0) -> Path:
    """A GGUF file of a real model's shape (`layers`: only the first that many) with random weights."""
    spec = dict(SHAPES[name])
    if layers is not None:
        spec["layers"] = layers
    writer = gguf.GGUFWriter(str(out), spec["arch"])
    writer.add_name(f"{name} (random weights, {spec['layers']} layers)")
    writer.add_context_length(spec["context"])
    writer.add_embedding_length(spec["hidden"])
    writer.add_block_count(spec["layers"])
    writer.add_feed_forward_length(spec["intermediate"])
    writer.add_head_count(spec["heads"])
    writer.add_head_count_kv(spec["kv_heads"])
    writer.add_key_length(spec["head_dim"])
    writer.add_value_length(spec["head_dim"])
    writer.add_rope_freq_base(spec["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(spec["experts"])
    writer.add_expert_used_count(spec["experts_used"])
    writer.add_expert_feed_forward_length(spec["expert_intermediate"])
    _copy_vocabulary(writer, vocab_file, spec["vocab"])
    tensors = list(_shape_tensors(spec))
    for tensor_name, shape, qtype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for tensor_name, shape, qtype in tensors:
        if qtype == _Q.F32:
            is_norm = "norm" in tensor_name  # norms 1, the router ~N(0, 0.02)
            data = np.ones(shape, np.float32) if is_norm else rng.standard_normal(shape, dtype=np.float32) * 0.02
            writer.write_tensor_data(data)
        else:
            writer.write_tensor_data(_random_blocks(rng, qtype, shape))
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-hf", type=Path, help="a HF model directory to convert")
    parser.add_argument("--arch", help="with --from-hf, llama.cpp's architecture: llama, qwen3moe, olmoe, ...")
    parser.add_argument("--qtype", default="F32", help="with --from-hf: the matrices' block type")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shape, random weights")
    parser.add_argument("--layers", type=int, help="with --shape: only the first N layers")
    parser.add_argument("--vocab", type=Path, help="with --shape: a GGUF file whose tokenizer to copy")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.shape:
        vocab = args.vocab or Path.home() / ".cache/fulmine/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        print(write_shape(args.shape, args.out, vocab, args.layers))
    elif args.from_hf and args.arch:
        print(write_from_hf(args.from_hf, args.out, args.arch, args.qtype))
    else:
        parser.error("pass --from-hf DIR --arch ARCH, or --shape NAME")


if __name__ == "__main__":
    main()
