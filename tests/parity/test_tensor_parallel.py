"""Tensor parallelism (distributed/): N processes on torch.distributed (gloo) compute what one does.

The reference is the same model in one process through the same dense float32 path; the ranks'
sums come in another order (all-reduced partial products), so logprobs agree within float32
tolerance and greedy tokens are equal. Every family of the tiny random models at TP=2, and the
embedded model (9 heads, 3 KV heads) at TP=3.
"""

from __future__ import annotations

import pytest

from fulmine import SamplingParams
from fulmine.config import ConfigError, EngineConfig
from fulmine.engine.llm_engine import LLMEngine
from fulmine.engine.outputs import fold_all
from tests.conftest import FAMILIES

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Paris is the capital of"]


def run(model: str | None, tp: int, **engine_args) -> list[tuple[list[int], list[list[tuple[int, float]]]]]:
    args = dict(speculative="off", executor="torch", tensor_parallel_size=tp) | engine_args
    engine = LLMEngine(model, EngineConfig(**args), progress=False)  # type: ignore[arg-type]
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
        ids = [engine.add_request(prompt, params) for prompt in PROMPTS]
        done, answers = {}, {}  # type: ignore[var-annotated]
        while engine.has_unfinished():
            for out in fold_all(answers, engine.step()):
                if out.finished:
                    done[out.request_id] = (out.token_ids, [lp.top for lp in out.logprobs or []])
        return [done[i] for i in ids]
    finally:
        if engine.ranks is not None:
            engine.ranks.close()


def assert_close(one, many, tolerance: float) -> None:
    for (tokens_a, top_a), (tokens_b, top_b) in zip(one, many):
        assert tokens_a == tokens_b
        for row_a, row_b in zip(top_a, top_b):
            assert [t for t, _ in row_a] == [t for t, _ in row_b]
            assert max(abs(a - b) for (_, a), (_, b) in zip(row_a, row_b)) < tolerance


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_and_four_ranks_compute_what_one_does(tiny_model_factory, family: str) -> None:
    """Four ranks over the tiny models' two KV heads: each rank holds a copy of the one it uses."""
    path = str(tiny_model_factory(family))
    dense = dict(dtype="float32", weight_dtype="float32")
    one = run(path, 1, **dense)
    assert_close(one, run(path, 2, **dense), 1e-4)
    assert_close(one, run(path, 4, **dense), 1e-4)


def test_ranks_as_ray_actors_compute_what_one_does(tiny_model_factory) -> None:
    """--distributed-backend ray: ranks 1.. as actors on a local Ray cluster, the same group."""
    ray = pytest.importorskip("ray")
    path = str(tiny_model_factory("llama"))
    dense = dict(dtype="float32", weight_dtype="float32")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert_close(run(path, 1, **dense), run(path, 2, distributed_backend="ray", **dense), 1e-4)
    finally:
        ray.shutdown()


def test_the_embedded_model_on_three_ranks() -> None:
    """Its GGUF blocks dequantized and split into thirds; the reference multiplies the same values
    (the exact kernels: float32 activations) in one process."""
    one = run(None, 1, weight_dtype="float32", exact_kernels=True)
    assert_close(one, run(None, 3, weight_dtype="float32"), 2e-3)


def test_a_size_that_does_not_divide_the_heads_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not divide the model's 9 attention heads"):
        LLMEngine(None, EngineConfig(tensor_parallel_size=2, speculative="off"), progress=False)


def test_a_server_on_three_ranks_answers_the_openai_client() -> None:
    import openai

    from tests.e2e.server import engine_loader, serve

    with serve(engine_loader(None, tensor_parallel_size=3, speculative="off"), served_model_name=("m",)) as server:
        try:
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8, temperature=0, stream=True
            )
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            assert text
        finally:
            ranks = server.engine.ranks
            assert ranks is not None
            ranks.close()
