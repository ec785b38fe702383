"""Structured outputs: what a constraint costs. Per-token mask time (p50 / p99, one core), the
compile time of a new schema (what the first request with it waits), and constrained against free
greedy decode on the same prompt, in the engine, with and without fast-forward (forced tokens fed
as drafts); and an extraction answer (copying the prompt) constrained, with n-gram speculation under
the grammar against none.

    python -m bench.structured                       # the embedded SmolLM2 (49k vocabulary)
    python -m bench.structured --model ~/.cache/fulmine/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from fulmine import LLM, SamplingParams, StructuredOutput
from fulmine.benchmark.report import percentile
from fulmine.engine.outputs import fold_all

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "skills", "address", "employed"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Write a JSON profile of a fictional software engineer."}]
# Extraction: the answer copies much of the prompt, where n-gram drafts (under the grammar) pay.
RECORD = (
    "Customer record 48213. Name: Margaret Okonkwo-Lindqvist. Email: margaret.okonkwo@northwind-traders.com. "
    "Phone: +1 415 555 0187. Address: 1450 Larkspur Avenue, Apartment 12B, Sacramento, California 95814, "
    "United States. Company: Northwind Traders International. Title: Senior Procurement Manager."
)
EXTRACT_PROMPT = [{"role": "user", "content": f"{RECORD}\nExtract every field of this record as JSON."}]
EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {key: {"type": "string"} for key in ("name", "email", "phone", "address", "company", "title")},
    "required": ["name", "email", "phone", "address", "company", "title"],
    "additionalProperties": False,
}


def decode_rate(llm: LLM, params: SamplingParams, reps: int, prompt: list = PROMPT) -> tuple[float, int]:
    """(median tok/s of the generated tokens after the first, tokens generated)."""
    rates, count = [], 0
    for _ in range(reps):
        engine = llm.engine
        engine.add_request(prompt, params)
        first, count, answers = None, 0, {}  # type: ignore[var-annotated]
        while engine.has_unfinished():
            for out in fold_all(answers, engine.step()):
                count = len(out.token_ids)
                if first is None and count:
                    first = time.perf_counter()
        rates.append((count - 1) / (time.perf_counter() - first))
    return statistics.median(rates), count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(args.model, progress=False, num_threads=args.threads, speculative="off")
    engine = llm.engine
    vocab = engine.model_config.vocab_size

    started = time.perf_counter()
    _ = engine.grammars.tokenizer
    tokenizer_s = time.perf_counter() - started
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    started = time.perf_counter()
    matcher = engine.grammars.matcher(structured)
    compile_s = time.perf_counter() - started

    # a constrained greedy answer, then the mask of every step along it, timed alone on this thread
    free = SamplingParams(max_tokens=200, temperature=0.0)
    constrained = SamplingParams(max_tokens=200, temperature=0.0, structured=structured)
    answer = llm.generate([PROMPT], constrained)[0]
    bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    mask_us = []
    for token in answer.token_ids:
        started = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        mask_us.append((time.perf_counter() - started) * 1e6)
        if not matcher.consume_token(token):
            break

    free_rate, free_tokens = decode_rate(llm, free, args.reps)
    constrained_rate, constrained_tokens = decode_rate(llm, constrained, args.reps)
    engine.config = replace(engine.config, grammar_fast_forward=False)  # the same tokens, one step each
    stepwise_rate, _ = decode_rate(llm, constrained, args.reps)
    engine.config = replace(engine.config, grammar_fast_forward=True)

    # extraction, speculation on (n-gram drafts cut to what the grammar allows) against off
    speculating = LLM(args.model, progress=False, num_threads=args.threads)
    extract = SamplingParams(
        max_tokens=200, temperature=0.0, structured=StructuredOutput("json_schema", json.dumps(EXTRACT_SCHEMA))
    )
    extract_off, _ = decode_rate(llm, extract, args.reps, EXTRACT_PROMPT)
    extract_on, extract_tokens = decode_rate(speculating, extract, args.reps, EXTRACT_PROMPT)
    extract_free, _ = decode_rate(speculating, replace(extract, structured=None), args.reps, EXTRACT_PROMPT)
    governor = speculating.engine.governor
    result = {
        "model": engine.source.name,
        "vocab": vocab,
        "grammar_tokenizer_s": tokenizer_s,
        "new_schema_compile_ms": compile_s * 1e3,
        "mask_us_p50": statistics.median(mask_us),
        "mask_us_p99": percentile(mask_us, 0.99),
        "mask_steps": len(mask_us),
        "free_tok_s": free_rate,
        "constrained_tok_s": constrained_rate,
        "constrained_over_free": constrained_rate / free_rate,
        "constrained_stepwise_tok_s": stepwise_rate,
        "stepwise_over_free": stepwise_rate / free_rate,
        "free_tokens": free_tokens,
        "constrained_tokens": constrained_tokens,
        "answer": answer.text,
        "extract_constrained_spec_off_tok_s": extract_off,
        "extract_constrained_spec_on_tok_s": extract_on,
        "extract_free_spec_on_tok_s": extract_free,
        "extract_spec_on_over_off": extract_on / extract_off,
        "extract_tokens": extract_tokens,
        "extract_draft_acceptance": governor.acceptance_rate if governor is not None else None,
    }
    print(f"model {result['model']} (vocabulary {vocab}), {args.threads} threads, medians of {args.reps}")
    print(f"grammar tokenizer built once:      {tokenizer_s * 1e3:8.0f} ms")
    print(f"a new schema compiled:             {compile_s * 1e3:8.1f} ms")
    print(f"mask per token p50 / p99:          {result['mask_us_p50']:8.0f} / {result['mask_us_p99']:.0f} us")
    print(f"greedy decode free / constrained:  {free_rate:8.1f} / {constrained_rate:.1f} tok/s "
          f"({result['constrained_over_free']:.2f}x; without fast-forward {stepwise_rate:.1f}, "
          f"{result['stepwise_over_free']:.2f}x)")  # fmt: skip
    print(f"extraction, constrained, speculation off / on: {extract_off:8.1f} / {extract_on:.1f} tok/s "
          f"({result['extract_spec_on_over_off']:.2f}x; free with speculation {extract_free:.1f})")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
