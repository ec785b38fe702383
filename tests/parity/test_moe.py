"""Mixtures of experts (Qwen3-MoE with a dense layer among its expert layers, OLMoE, Mixtral) on tiny
random models: logits and 32 greedy tokens against transformers, whole and chunked; the same model
as a GGUF file in llama.cpp's names (bench/synthetic_gguf.py) against transformers; its experts kept in
Q8_0 blocks (interleaved in the fast mode) through the fused C decoder against the PyTorch path; and
batch invariance (alone == batched == chunked) in the default mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.synthetic_gguf import write_from_hf
from fulmine import LLM, SamplingParams
from fulmine.layers.experts import SparseMoE
from tests.conftest import MOE_FAMILIES, build_tiny_model
from tests.parity.test_hf_parity import NUM_STEPS, PROMPT, fulmine_greedy, hf_greedy, parity_llm

GGUF_ARCH = {"qwen3_moe": "qwen3moe", "olmoe": "olmoe", "mixtral": "llama"}  # llama.cpp's names
FAMILIES = sorted(MOE_FAMILIES)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[Path, list[int], list[int], list[torch.Tensor]]] = {}

    def make(family: str) -> tuple[Path, list[int], list[int], list[torch.Tensor]]:
        """The HF directory, the prompt's ids, transformers' greedy tokens and their logits."""
        if family not in cache:
            path = build_tiny_model(family, tmp_path_factory.mktemp(family))
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(path).encode(PROMPT)
            cache[family] = (path, ids, *hf_greedy(path, ids, NUM_STEPS))
        return cache[family]

    return make


def assert_matches(llm: LLM, ids: list[int], ref_tokens: list[int], ref_logits: list[torch.Tensor]) -> None:
    tokens, logits = fulmine_greedy(llm, ids, NUM_STEPS)
    for step, (ours, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    assert tokens == ref_tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_logits_and_greedy_match_transformers(moe_model, family: str, chunked: bool) -> None:
    path, ids, ref_tokens, ref_logits = moe_model(family)
    llm = parity_llm(path, chunked)
    layers = llm.engine.runner.model.layers
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [
        not (family == "qwen3_moe" and i == 1) for i in range(len(layers))
    ]
    assert_matches(llm, ids, ref_tokens, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_file_matches_transformers(moe_model, family: str, tmp_path: Path) -> None:
    """The model written as llama.cpp writes it (stacked experts' tensors, expert_count metadata, a
    Mixtral as a "llama" file with permuted q/k rows), float32, read back exactly, through the
    fused C decoder (float32 weights in its exact mode)."""
    path, ids, ref_tokens, ref_logits = moe_model(family)
    gguf = write_from_hf(path, tmp_path / "model.gguf", GGUF_ARCH[family], "F32")
    llm = LLM(str(gguf), weight_dtype="float32", exact_kernels=True, progress=False, speculative="off")
    assert llm.tokenizer.encode(PROMPT) == ids
    assert llm.engine.runner.executors[0].name == "cpu-fused"
    assert_matches(llm, ids, ref_tokens, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_experts_match_the_pytorch_path(moe_model, family: str, tmp_path: Path) -> None:
    """Q8_0 experts kept as blocks: the C decoder's experts (routing, grouping by expert, the weighted
    sum) against the PyTorch path, with exact kernels and with int8 activations (interleaved rows); a
    float32 cache (the two paths round a prompt's own keys to a float16 cache at different points)."""
    path, ids, _, _ = moe_model(family)
    gguf = str(write_from_hf(path, tmp_path / "model.gguf", GGUF_ARCH[family], "Q8_0"))
    for exact in (True, False):
        runs = []
        for executor in ("torch", "cpu-fused"):
            engine = dict(exact_kernels=exact, executor=executor, kv_cache_dtype="float32", speculative="off")
            llm = LLM(gguf, progress=False, **engine)
            runs.append(fulmine_greedy(llm, ids, 16))
        (torch_tokens, torch_logits), (fused_tokens, fused_logits) = runs
        assert fused_tokens == torch_tokens
        for ours, ref in zip(fused_logits, torch_logits):
            torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_tokens_alone_batched_and_chunked(moe_model, family: str, tmp_path: Path) -> None:
    """The default mode (Q8_0 experts interleaved, int8 activations, float16 cache): a request's tokens do
    not depend on what shares its steps, so on which experts the other rows chose."""
    path, _, _, _ = moe_model(family)
    gguf = str(write_from_hf(path, tmp_path / "model.gguf", GGUF_ARCH[family], "Q8_0"))
    prompts = ["The quick brown fox", "Paris is the capital of France. " * 6, "def main(): return 42", "Café 東京 🎉"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(gguf, progress=False, speculative="off", enable_prefix_caching=False)
    alone = [plain.generate(prompt, greedy)[0].token_ids for prompt in prompts]
    for engine_args in ({"speculative": "off"}, {"speculative": "off", "max_num_batched_tokens": 7}):
        llm = LLM(gguf, progress=False, **engine_args)
        assert [o.token_ids for o in llm.generate(prompts, greedy)] == alone, engine_args


def test_router_keeps_full_precision(moe_model) -> None:
    """Weights narrowed to float16 (the CPU default) or quantized leave the router in float32."""
    path, _, _, _ = moe_model("qwen3_moe")
    for quantization in ("auto", "int8"):
        llm = LLM(str(path), progress=False, quantization=quantization)
        moe = llm.engine.runner.model.layers[0].mlp
        assert isinstance(moe, SparseMoE)
        assert moe.gate.weight.dtype == torch.float32 and moe.gate.quant is None
        assert moe.experts.gate_up_proj.weight.dtype != torch.float32 or moe.experts.gate_up_proj.quant is not None
