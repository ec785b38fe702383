"""What thinking costs: splitting an answer into thinking and content per token, and the time to the
first answer token (TTFAT) under a thinking budget.

    python -m bench.reasoning                      # the embedded model, budgets 16 and 64
    python -m bench.reasoning --budgets 32 128 --repeats 5

1. The parsers, per token: the server's text split (ReasoningParser, fed token-sized pieces of a
   long answer) and the engine's per-token reading (Thinking.read, as the output processor calls it).
2. TTFAT: the embedded model (no reasoning model's weights are on the package index) made to think:
   `--reasoning-parser think`, its prompt ending in an opened <think> block, so every token is
   thinking until the budget closes it (its `</think>` is several tokens here, forced as drafts).
   Against the target TTFT + budget x ITL + one step, ITL the mean gap of the same request.
Medians over the repeats; a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from fulmine import LLM, SamplingParams
from fulmine.engine.output_processor import Thinking
from fulmine.reasoning import ReasoningFormat, ReasoningParser

THOUGHT = "Let me think about this step by step. First, the primes below twenty are 2, 3, 5, 7, 11. " * 40
ANSWER = "The answer is eight primes: 2, 3, 5, 7, 11, 13, 17 and 19. " * 10


def parser_cost(tokenizer: Any, repeats: int) -> dict[str, float]:
    fmt = ReasoningFormat("think", end_ids=tuple(tokenizer.encode("</think>", add_special_tokens=False)))
    ids = list(tokenizer.encode(f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}", add_special_tokens=False))
    pieces = [str(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]  # the text after each token
    deltas = [pieces[i + 1][len(pieces[i]) :] for i in range(len(ids))]
    server, engine = [], []
    for _ in range(repeats):
        parser = ReasoningParser(fmt)
        started = time.perf_counter()
        for delta in deltas:
            parser.feed(delta)
        parser.feed("", final=True)
        server.append((time.perf_counter() - started) / len(ids) * 1e6)
        thinking = Thinking(fmt, opened=False, budget=None)
        started = time.perf_counter()
        for text in pieces[1:]:
            thinking.read(text)
        engine.append((time.perf_counter() - started) / len(ids) * 1e6)
    return {"server_us_per_token": statistics.median(server), "engine_us_per_token": statistics.median(engine)}


def ttfat(llm: LLM, budget: int, repeats: int) -> dict[str, float]:
    engine = llm.engine
    chat = engine.encode_prompt([{"role": "user", "content": "How many primes are there below 20?"}])
    prompt = chat + list(engine.tokenizer.encode("<think>\n", add_special_tokens=False))
    params = SamplingParams(temperature=0.0, max_tokens=budget + 16, ignore_eos=True, reasoning_budget=budget)
    rows = []
    for _ in range(repeats):
        request_id = engine.add_request(prompt, params)
        times: list[float] = []
        last = None
        while engine.has_unfinished():
            for output in engine.step():
                if output.request_id == request_id and output.new_token_ids:
                    times.append(time.monotonic())
                    last = output
        assert last is not None
        m = last.metrics
        assert m.first_token_time is not None and m.first_answer_time is not None
        gaps = [b - a for a, b in zip(times, times[1:])]
        step = statistics.mean(gaps)  # (TTFAT sums the steps: their mean, not their median, is the fair ITL)
        rows.append(
            {
                "ttft_ms": (m.first_token_time - m.arrival_time) * 1e3,
                "ttfat_ms": (m.first_answer_time - m.arrival_time) * 1e3,
                "itl_ms": step * 1e3,
                "reasoning_tokens": last.num_reasoning_tokens,
            }
        )
    out = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    out["target_ms"] = out["ttft_ms"] + budget * out["itl_ms"] + out["itl_ms"]
    out["met"] = out["ttfat_ms"] <= out["target_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the embedded model)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    llm = LLM(args.model, speculative="off", reasoning_parser="think", progress=False)
    cost = parser_cost(llm.engine.tokenizer, args.repeats)
    print(
        f"parsing: server {cost['server_us_per_token']:.2f} us/token, engine {cost['engine_us_per_token']:.2f} us/token"
    )
    results: dict[str, Any] = {"parsing": cost}
    print(f"{'budget':>7} {'TTFT ms':>9} {'ITL ms':>8} {'TTFAT ms':>9} {'target ms':>10} {'thinking':>9}")
    for budget in args.budgets:
        row = ttfat(llm, budget, args.repeats)
        results[f"budget_{budget}"] = row
        print(
            f"{budget:>7} {row['ttft_ms']:>9.1f} {row['itl_ms']:>8.2f} {row['ttfat_ms']:>9.1f} "
            f"{row['target_ms']:>10.1f} {row['reasoning_tokens']:>9.0f}{'' if row['met'] else '  MISSED'}"
        )
    print(json.dumps({"bench": "reasoning", **results}))


if __name__ == "__main__":
    main()
