"""One engine, one process: load it, time decode and prefill, print one JSON line.

Run by bench/compare.py (python -m bench.engines ENGINE ...), so that load time and peak RSS
belong to that engine alone. Every timed prompt is fresh (a unique first line), so no engine
serves it from a prefix cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from fulmine.benchmark.workloads import SAMPLING

CHAT_QUESTION = "What is the capital of France? Answer in one sentence."
LONG_TEXT = (
    "The history of computing is a story of ever smaller, faster and cheaper machines. "
    "Early computers filled rooms and used vacuum tubes; transistors replaced tubes, and integrated "
    "circuits put thousands, then billions, of transistors on one chip. "
)


GREEDY = SAMPLING["greedy"]


def long_prompt(tokenize: Callable[[str], list[int]], num_tokens: int, salt: int) -> list[int]:
    ids = tokenize(f"Document {salt}.\n" + LONG_TEXT * (num_tokens // 40 + 2))
    return ids[:num_tokens]


class Engine:
    """What each engine provides: tokenization, chat prompts and a token stream."""

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def chat_prompt(self, question: str) -> list[int]:
        raise NotImplementedError

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, float] = GREEDY) -> Iterator[int]:
        """Yields once per generated token (EOS ignored)."""
        raise NotImplementedError


class Fulmine(Engine):
    def __init__(self, model: str | None, threads: int, **engine_args: Any) -> None:
        from fulmine import LLM

        self.llm = LLM(model, progress=False, num_threads=threads, **engine_args)

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenizer.encode(text))

    def chat_prompt(self, question: str) -> list[int]:
        if self.llm.tokenizer.chat_template is None:  # a base model: the question as plain text
            return self.tokenize(question)
        return self.llm.engine.encode_prompt([{"role": "user", "content": question}])

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, float] = GREEDY) -> Iterator[int]:
        from fulmine import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)  # type: ignore[arg-type]
        engine = self.llm.engine
        engine.add_request(prompt_ids, params)
        while engine.has_unfinished():
            for out in engine.step():
                for _ in out.new_token_ids:  # a speculative step may bring several
                    yield 1


class LlamaCpp(Engine):
    def __init__(self, model: str, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def chat_prompt(self, question: str) -> list[int]:
        from fulmine.models.source import resolve
        from fulmine.tokenizer import apply_chat_template, load_tokenizer

        tokenizer = load_tokenizer(resolve(self.model_path))
        if tokenizer.chat_template is None:  # a base model: the question as plain text
            return self.tokenize(question)
        return apply_chat_template(tokenizer, [{"role": "user", "content": question}])

    @property
    def model_path(self) -> str:
        return str(self.llm.model_path)

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, float] = GREEDY) -> Iterator[int]:
        temperature = sampling["temperature"]
        top_k = 1 if temperature == 0.0 else int(sampling.get("top_k", 0))  # top_k 1: llama.cpp's greedy
        top_p, min_p = sampling.get("top_p", 1.0), sampling.get("min_p", 0.0)
        self.llm.reset()
        tokens = self.llm.generate(prompt_ids, temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p, reset=True)
        for count, token in enumerate(tokens, start=1):
            yield token
            if count >= max_tokens:
                return


class Transformers(Engine):
    def __init__(self, model: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        directory, name = model.rsplit("/", 1)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        self.model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def chat_prompt(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, float] = GREEDY) -> Iterator[int]:
        import torch

        if sampling != GREEDY:
            raise NotImplementedError("the transformers baseline decodes greedily")
        with torch.no_grad():
            out = self.model(torch.tensor([prompt_ids]), use_cache=True)
            cache = out.past_key_values
            token = out.logits[0, -1].argmax()
            yield int(token)
            for _ in range(max_tokens - 1):
                out = self.model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[0, -1].argmax()
                yield int(token)


def time_stream(
    engine: Engine, prompt_ids: list[int], max_tokens: int, sampling: dict[str, float] = GREEDY
) -> tuple[float, float]:
    """(time to first token, decode tok/s over the rest)."""
    started = time.perf_counter()
    first = last = None
    count = 0
    for _ in engine.stream(prompt_ids, max_tokens, sampling):
        last = time.perf_counter()
        first = first or last
        count += 1
    assert first is not None and last is not None and count == max_tokens, count
    return first - started, (count - 1) / (last - first)


def native_binary(name: str) -> str:
    """A native llama.cpp program (llama-bench, llama-server) that bench/build_llama_cpp.sh built."""
    import os
    import shutil
    from pathlib import Path

    found = [
        Path(os.environ.get("LLAMA_CPP_BIN", "")) / name,
        Path.home() / ".cache/fulmine/llama.cpp/bin" / name,
        Path(shutil.which(name) or "/nonexistent"),
    ]
    binary = next((path for path in found if path.is_file()), None)
    if binary is None:
        raise SystemExit(f"{name} not found: run `bash bench/build_llama_cpp.sh` (or set LLAMA_CPP_BIN)")
    return str(binary)


def llama_bench(model: str, threads: int, decode_tokens: int, prompt_tokens: int, depth: int) -> dict[str, Any]:
    """Native llama.cpp's own benchmark (bench/build_llama_cpp.sh builds it): prompt processing of
    `prompt_tokens` and generation of `decode_tokens`, and with `depth` generation after that many
    tokens of context; one repetition (compare.py repeats)."""
    import subprocess

    binary = native_binary("llama-bench")
    command = [str(binary), "-m", model, "-t", str(threads), "-p", str(prompt_tokens), "-n", str(decode_tokens)]
    out = subprocess.run([*command, "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    tests = json.loads(out.stdout)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    result = {
        "engine": "llama-bench",
        "decode_tok_s": decode,
        "ttft_long_s": prompt_tokens / prefill,
        "long_prompt_tokens": prompt_tokens,
        "prefill_tok_s": prefill,
        # the larger of its runs (the model, its context of prompt + decode tokens, compute buffers)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if depth:
        deep = [str(binary), "-m", model, "-t", str(threads), "-p", "0", "-n", "64", "-d", str(depth)]
        out = subprocess.run([*deep, "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
        result["decode_tok_s_deep"] = json.loads(out.stdout)[0]["avg_ts"]
    return result


def engine_options(text: str) -> dict[str, Any]:
    """'speculative=off,num_speculative_tokens=3' -> EngineConfig keyword arguments."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "engine",
        help="fulmine, llama.cpp (llama-cpp-python in process), llama-bench (native, bench/build_llama_cpp.sh) or "
        "transformers; fulmine:key=value,... passes EngineConfig fields",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--salt", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0, help="also decode 64 tokens after a prompt this long")
    parser.add_argument("--code-tokens", type=int, default=160, help="decoded of the code-edit answer (greedy)")
    args = parser.parse_args()
    started = time.perf_counter()
    engine: Engine
    name, _, options = args.engine.partition(":")
    if name == "llama-bench":  # its own timing loop: decode and prefill only
        print(json.dumps(llama_bench(args.model, args.threads, args.decode_tokens, args.long_prompt, args.depth)))
        return
    if name == "fulmine":
        import torch  # noqa: F401  (import time is not load time)

        started = time.perf_counter()
        engine = Fulmine(args.model, args.threads, **engine_options(options))
    elif name == "llama.cpp":
        engine = LlamaCpp(args.model, args.threads)
    elif name == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        started = time.perf_counter()
        engine = Transformers(args.model, args.threads)
    else:
        parser.error(f"unknown engine {name!r}")
    load_s = time.perf_counter() - started
    time_stream(engine, engine.tokenize("Warm up."), 4)
    chat_ttft, _ = time_stream(engine, engine.chat_prompt(f"({args.salt}) {CHAT_QUESTION}"), 2)
    long_ids = long_prompt(engine.tokenize, args.long_prompt, args.salt)
    long_ttft, _ = time_stream(engine, long_ids, 2)
    decode: dict[str, float] = {}
    for name, sampling in SAMPLING.items():
        prompt = engine.chat_prompt(f"[{args.salt}] Tell me a story ({name}).")
        try:
            _, decode[name] = time_stream(engine, prompt, args.decode_tokens, sampling)
        except NotImplementedError:
            continue
    result: dict[str, Any] = {
        "engine": args.engine,
        "load_s": load_s,
        "decode_tok_s": decode["greedy"],
        **{f"decode_tok_s_{name}": tok_s for name, tok_s in decode.items() if name != "greedy"},
        "ttft_long_s": long_ttft,
        "long_prompt_tokens": len(long_ids),
        "prefill_tok_s": len(long_ids) / long_ttft,
        "ttft_chat_s": chat_ttft,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    # a code edit: the answer repeats most of the prompt (where prompt-lookup drafting pays)
    from fulmine.benchmark.workloads import workload

    code_prompt = engine.chat_prompt(f"[{args.salt}] " + workload("code").prompts[0][0]["content"])
    _, result["decode_tok_s_code"] = time_stream(engine, code_prompt, args.code_tokens)
    if args.depth:  # decode with a long context behind it (attention reads it all each token)
        _, result["decode_tok_s_deep"] = time_stream(
            engine, long_prompt(engine.tokenize, args.depth, args.salt + 1), 64
        )
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
