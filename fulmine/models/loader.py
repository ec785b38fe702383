"""Build a model and fill it from its checkpoint (safetensors files or a GGUF file).

Checkpoint tensors are streamed one at a time under their HF names, so peak memory is the model
plus one tensor. A progress bar runs on stderr while tensors load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from tqdm import tqdm

from fulmine import kernels
from fulmine.config import ConfigError, ModelConfig
from fulmine.layers.linear import Linear
from fulmine.layers.tensor_parallel import TensorParallel, shard_config, shard_tensor
from fulmine.layers.weights import QuantizedTensor, WeightTensor
from fulmine.models.decoder import CausalLM
from fulmine.models.registry import model_for
from fulmine.models.source import ModelSource

GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_SKIPPED = {"rope_freqs.weight"}  # folded into the rotary embedding's config
logger = logging.getLogger("fulmine.loader")


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    weight_dtype: torch.dtype | None = None,
    progress: bool = True,
    quantization: str = "none",
    exact_kernels: bool = False,
    tp: TensorParallel | None = None,
) -> CausalLM:
    """`dtype` is the activations' (and norms'); `weight_dtype` the matrices', if narrower.

    The model is laid out on the meta device and allocated uninitialized in its final dtypes,
    so loading never holds a second, wider copy; every parameter must then come from the
    checkpoint, which is checked. `quantization` is EngineConfig's (auto, none, int8, int4). With
    `tp`, the model is that rank's part (layers/tensor_parallel.py), its matrices dense.
    """
    if quantization in ("int8", "int4") and (kernels.cpu() is None or device.type != "cpu"):
        raise ConfigError(f"--quantization {quantization} needs fulmine's C kernels on the CPU, which are not built")
    keep_blocks = (
        quantization == "auto"
        and kernels.cpu() is not None
        and device.type == "cpu"
        and dtype == torch.float32
        and tp is None
    )
    config = source.config if tp is None else shard_config(source.config, tp)
    with torch.device("meta"):
        model = model_for(config).to(dtype)
    if weight_dtype is not None and weight_dtype != dtype:
        model.narrow_weights(weight_dtype)
    _allocate(model, device)
    model.tie_weights()
    if keep_blocks:
        model.keep_blocks()
    count, tensors = _checkpoint(source)
    missing = model.weight_slots()
    bar = tqdm(
        total=count,
        desc=f"Loading {source.name}",
        unit="tensor",
        disable=not progress,
        leave=False,
        mininterval=0.25,
    )
    for name, tensor in tensors:
        try:
            if tp is not None:
                tensor = shard_tensor(name, tensor, source.config, tp)
            filled = model.load_weight(name, tensor)
            if filled is not None:
                missing.discard(filled)
        except (AttributeError, ValueError) as error:
            raise ConfigError(f"checkpoint tensor {name!r} does not fit the model: {error}") from None
        bar.update()
    bar.close()
    model.fold_norm_offsets()
    if tp is not None:
        model.set_tensor_parallel(tp, source.config.vocab_size)
    model.finish_loading({"int8": kernels.Q8_0, "int4": kernels.Q4_1}.get(quantization), exact_kernels)
    _report_unread_types(model, source)
    if source.gguf is not None:
        source.gguf.close()  # every tensor is copied into the model; drop the file's pages
    if missing:
        names_missing = sorted({name for name, _ in missing})
        raise ConfigError(f"{source.path} lacks {len(names_missing)} tensors, e.g. {names_missing[:3]}")
    return model.eval()


def _allocate(model: CausalLM, device: torch.device) -> None:
    """Give every parameter of a model laid out on the meta device uninitialized memory on `device`
    (what Module.to_empty does, without the first-call import of torch's symbolic-shape machinery
    that costs 0.7 s of load time)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            empty = torch.empty(param.shape, dtype=param.dtype, device=device)
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=False))


def _report_unread_types(model: CausalLM, source: ModelSource) -> None:
    """One log line naming the layers whose GGUF blocks the kernels do not read (they were dequantized)."""
    unread: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            for qtype in sorted(module.unread_types):
                unread.setdefault(qtype, []).append(name)
    if unread:
        listed = "; ".join(
            f"{qtype} in {len(names)} layers ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for qtype, names in unread.items()
        )
        readable = ", ".join(GGMLQuantizationType(t).name for t in kernels.BLOCK_TYPES)
        logger.warning(
            "%s: block types the kernels do not read are dequantized (slower, more memory): %s; the kernels read %s",
            source.path.name,
            listed,
            readable,
        )


def _checkpoint(source: ModelSource) -> tuple[int, Iterator[tuple[str, WeightTensor]]]:
    """How many tensors the checkpoint yields, and the tensors under their HF names."""
    if source.gguf is not None:
        names = [n for n in source.gguf.tensors if n not in _GGUF_SKIPPED]
        # a stacked experts' tensor comes as one per expert
        stacked = [n for n in names if _stacked_projection(n)]
        count = len(names) - len(stacked) + sum(source.gguf.tensors[n].shape[0] for n in stacked)
        return count, _gguf_tensors(source, names)
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{source.path} has no *.safetensors files")
    names = []
    for file in files:
        with safe_open(file, "pt") as handle:
            names.extend(handle.keys())
    return len(names), _safetensors_tensors(files)


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, WeightTensor]]:
    for file in files:
        with safe_open(file, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                yield name, handle.get_tensor(name)


# llama.cpp's stacked experts (one tensor per projection, experts outermost) -> HF's per-expert name
GGUF_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GGUF_EXPERT = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}  # older files: one each


def _stacked_projection(gguf_name: str) -> str | None:
    """The HF projection a stacked experts' tensor (blk.N.ffn_gate_exps.weight) holds, else None."""
    parts = gguf_name.split(".")
    return GGUF_STACKED_EXPERTS.get(parts[2]) if parts[0] == "blk" and len(parts) == 4 else None


def _gguf_tensors(source: ModelSource, names: list[str]) -> Iterator[tuple[str, WeightTensor]]:
    gguf, config = source.gguf, source.config
    assert gguf is not None
    for gguf_name in names:
        tensor = gguf.load(gguf_name)
        parts = gguf_name.split(".")
        projection = _stacked_projection(gguf_name)
        if projection is not None:
            yield from _split_experts(tensor, f"model.layers.{parts[1]}.mlp.experts", projection)
            continue
        if parts[0] == "blk" and len(parts) == 5 and parts[2] in _GGUF_EXPERT and parts[3].isdigit():
            yield f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{_GGUF_EXPERT[parts[2]]}.{parts[4]}", tensor
            continue
        name = _hf_name(gguf_name, source.family.model.gguf_layer_names)
        if source.family.gguf_permuted_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            num_heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            tensor = _unpermute_rows(tensor, num_heads)
        yield name, tensor


def _split_experts(tensor: QuantizedTensor, prefix: str, projection: str) -> Iterator[tuple[str, QuantizedTensor]]:
    """A stacked experts' tensor [experts, rows, cols] as each expert's matrix (views of its rows)."""
    if len(tensor.shape) != 3:
        raise ConfigError(f"{prefix}: stacked experts' tensor of shape {tensor.shape}, not 3-D")
    num_experts, rows = tensor.shape[0], tensor.shape[1]
    for expert in range(num_experts):
        raw = tensor.raw[expert * rows : (expert + 1) * rows]
        yield f"{prefix}.{expert}.{projection}.weight", QuantizedTensor(raw, tensor.qtype, tensor.shape[1:])


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str:
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    raise ConfigError(f"unknown GGUF tensor {gguf_name!r}")


def _unpermute_rows(tensor: QuantizedTensor, num_heads: int) -> QuantizedTensor:
    """Undo llama.cpp's q/k row order (pairs interleaved per head) back to HF's rotate-half order.

    The converter maps HF row (head, half, i) to GGUF row (head, i, half); rows hold whole
    quantization blocks, so the reorder needs no dequantization.
    """
    rows = tensor.shape[0]
    half = rows // num_heads // 2
    gguf_row = np.arange(rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)
    return tensor.take_rows(gguf_row)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> CausalLM:
    """A model of this shape with random weights (no checkpoint): for benchmarks of shapes nobody
    ships a file of here, e.g. Llama-3-8B's on a GPU. Matrices ~ N(0, 0.02), norms 1, biases 0."""
    with torch.device("meta"):
        model = model_for(config).to(dtype)
    _allocate(model, device)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    model.finish_loading()
    return model.eval()
