"""The command line: `fulmine chat`, `fulmine generate` and `fulmine serve`.

Engine flags are generated from EngineConfig's fields, so config lives in one place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from fulmine.config import ConfigError, EngineConfig, ServerConfig

_ENGINE_FLAGS_SKIPPED = frozenset({"seed"})  # per-request --seed is the sampling seed


def _add_config_flags(group: argparse._ArgumentGroup, config: type, skipped: frozenset[str] = frozenset()) -> None:
    """One flag per dataclass field: --field-name, typed from the annotation."""
    for field in dataclasses.fields(config):
        if field.name in skipped:
            continue
        flag = f"--{field.name.replace('_', '-')}"
        text = field.metadata.get("help", "")
        if field.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        elif field.type == "tuple[str, ...]":
            group.add_argument(flag, action="append", default=[], help=text)
        else:
            kind = {
                "int | None": int,
                "int": int,
                "float": float,
                "float | None": float,
                "str": str,
                "str | None": str,
            }[str(field.type)]
            default = "" if field.default is None else f" (default: {field.default})"
            group.add_argument(flag, type=kind, default=field.default, help=text + default)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=None,
        help="HF model directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    _add_config_flags(group, EngineConfig, _ENGINE_FLAGS_SKIPPED)


def _add_sampling_flags(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fulmine", description="Latency-first LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="interactive chat in the terminal, streaming")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_flags(chat, max_tokens=512)
    _add_engine_flags(chat)
    generate = commands.add_parser("generate", help="one-shot generation to stdout, streaming")
    generate.add_argument("prompt")
    generate.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    generate.add_argument("--stats", action="store_true", help="print TTFT and decode speed to stderr")
    _add_sampling_flags(generate, max_tokens=256)
    _add_engine_flags(generate)
    serve = commands.add_parser("serve", help="the OpenAI-compatible HTTP server")
    _add_config_flags(serve.add_argument_group("server"), ServerConfig)
    _add_engine_flags(serve)
    bench = commands.add_parser(
        "bench",
        help="latency benchmark of an OpenAI-compatible endpoint (TTFT, ITL, TPOT, goodput), or fulmine vs llama.cpp",
    )
    from fulmine.benchmark.run import add_arguments

    add_arguments(bench)
    plan = commands.add_parser(
        "plan", help="capacity from this machine's measured steps: users per replica at a speed, replicas and power"
    )
    from fulmine.plan import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    plan.add_argument(
        "--cpu-watts-per-core", type=float, default=10.0, help="for the energy estimate where no counter is readable"
    )
    _add_engine_flags(plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench":
        from fulmine.benchmark.run import main as bench

        return bench(args)
    if args.command == "plan":
        return _plan(args)
    try:
        params = _sampling_params(args)  # bad values fail before the model loads
        llm = _load(args)
        return _chat(llm, args, params) if args.command == "chat" else _generate(llm, args, params)
    except ConfigError as error:
        print(f"fulmine: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fulmine generate ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(EngineConfig)
            if f.name not in _ENGINE_FLAGS_SKIPPED
        }
    )


def _plan(args: argparse.Namespace) -> int:
    from fulmine.engine.llm_engine import LLMEngine
    from fulmine.plan import main as plan

    try:
        # plans are for plain decoding (speculation only adds where drafts are accepted)
        config = dataclasses.replace(_engine_config(args), speculative="off")
        engine = LLMEngine(args.model, config, progress=False)
    except ConfigError as error:
        print(f"fulmine: error: {error}", file=sys.stderr)
        return 2
    return plan(args, engine, args.cpu_watts_per_core)


def _serve(args: argparse.Namespace) -> int:
    import logging

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    keys = [*fields["api_key"], *filter(None, os.environ.get("FULMINE_API_KEY", "").split(","))]
    fields["api_key"] = tuple(keys)
    fields["served_model_name"] = tuple(fields["served_model_name"])
    try:
        server_config, engine_config = ServerConfig(**fields), _engine_config(args)
    except ConfigError as error:
        print(f"fulmine: error: {error}", file=sys.stderr)
        return 2
    if engine_config.node_rank > 0:  # a worker node of a tensor-parallel engine: no API, its ranks only
        from fulmine.engine.ranks import run_node

        print(f"fulmine: node {engine_config.node_rank}: ranks joining {engine_config.master_addr}", file=sys.stderr)
        return run_node(engine_config)
    import uvicorn

    from fulmine.engine.llm_engine import LLMEngine
    from fulmine.replicas.front import connect as connect_ray
    from fulmine.replicas.front import start as start_replicas
    from fulmine.server.api import create_app
    from fulmine.server.engine_client import EngineClient
    from fulmine.server.lifecycle import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: list[BaseException] = []
    server: Server | None = None

    def on_fatal(error: BaseException) -> None:  # from the loader or a dead engine's thread
        failed.append(error)
        if server is not None:
            server.should_exit = True

    if server_config.replicas or engine_config.distributed_backend == "ray":
        try:
            connect_ray(server_config)  # here, on the main thread (see connect)
        except ConfigError as error:
            print(f"fulmine: error: {error}", file=sys.stderr)
            return 2

    def load() -> LLMEngine | EngineClient:
        if server_config.replicas:  # engines as Ray Serve replicas, this process their front
            return start_replicas(args.model, engine_config, server_config)
        return LLMEngine(args.model, engine_config, progress=True)

    app = create_app(server_config, load, on_fatal)
    server = Server(
        uvicorn.Config(
            app, host=server_config.host, port=server_config.port, log_level="info", timeout_graceful_shutdown=5
        ),
        app.state.fulmine,
    )
    auth = f"{len(keys)} API key(s)" if keys else "no API key"
    print(
        f"fulmine: serving the OpenAI API at http://{server_config.host}:{server_config.port}/v1 and a chat "
        f"page at http://{server_config.host}:{server_config.port}/ ({auth}); loading the model ...",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down gracefully, then re-raises Ctrl-C
        server.run()
    if failed:
        print(f"fulmine: error: {failed[0]}", file=sys.stderr)
        return 2 if app.state.fulmine.load_error is not None else 1
    return 0


def _load(args: argparse.Namespace) -> Any:
    print(f"fulmine: loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    engine_args = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if f.name not in _ENGINE_FLAGS_SKIPPED
    }
    config = EngineConfig(**engine_args)  # validated before the slow imports
    from fulmine.llm import LLM  # imports torch

    started = time.perf_counter()
    llm = LLM(args.model, **dataclasses.asdict(config))
    info = llm.engine.describe()
    print(
        f"fulmine: {info['model']} ({info['architecture']}) on {info['device']}, "
        f"loaded in {time.perf_counter() - started:.2f} s",
        file=sys.stderr,
    )
    return llm


def _sampling_params(args: argparse.Namespace) -> Any:
    from fulmine.request import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


class _Interrupt:
    """While active, Ctrl-C sets a flag (checked between steps) instead of raising."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Interrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _stream(llm: Any, prompt: Any, params: Any, interrupt: _Interrupt) -> Iterator[Any]:
    """Stream outputs, stopping (and aborting the request) when Ctrl-C is pressed."""
    stream = llm.stream(prompt, params)
    try:
        for output in stream:
            yield output
            if interrupt.requested:
                return
    finally:
        stream.close()


@contextlib.contextmanager
def _reported_errors() -> Iterator[list[RuntimeError]]:
    """An answer the engine could not finish is reported on one line (and kept in the yielded list);
    the program goes on."""
    errors: list[RuntimeError] = []
    try:
        yield errors
    except RuntimeError as error:
        errors.append(error)
        print(f"\nfulmine: error: {error}", file=sys.stderr)


def _print_answer(llm: Any, prompt: Any, params: Any) -> tuple[str, bool]:
    """Stream one answer to stdout; returns (text, interrupted). Stats go to stderr."""
    started = time.monotonic()
    pieces: list[str] = []
    first_token_at = last_token_at = None
    num_tokens = 0
    with _Interrupt() as interrupt, _reported_errors():
        for output in _stream(llm, prompt, params, interrupt):
            now = time.monotonic()
            first_token_at = first_token_at or output.metrics.first_token_time or now
            last_token_at, num_tokens = now, len(output.token_ids)
            if output.new_text:
                pieces.append(output.new_text)
                sys.stdout.write(output.new_text)
                sys.stdout.flush()
        interrupted = interrupt.requested
    sys.stdout.write("\n")
    if first_token_at is not None and last_token_at is not None:
        decode = (num_tokens - 1) / (last_token_at - first_token_at) if last_token_at > first_token_at else 0.0
        note = ", interrupted" if interrupted else ""
        print(
            f"[TTFT {1000 * (first_token_at - started):.0f} ms · {decode:.1f} tok/s decode · "
            f"{num_tokens} tokens{note}]",
            file=sys.stderr,
        )
    return "".join(pieces), interrupted


def _generate(llm: Any, args: argparse.Namespace, params: Any) -> int:
    prompt: Any = args.prompt
    if not args.raw and llm.tokenizer.chat_template is not None:
        prompt = [{"role": "user", "content": args.prompt}]
    if args.stats:
        _print_answer(llm, prompt, params)
        return 0
    with _reported_errors() as errors, _Interrupt() as interrupt:
        for output in _stream(llm, prompt, params, interrupt):
            sys.stdout.write(output.new_text)
            sys.stdout.flush()
    if errors:
        return 1
    sys.stdout.write("\n")
    return 130 if interrupt.requested else 0


def _chat(llm: Any, args: argparse.Namespace, params: Any) -> int:
    history: list[dict[str, str]] = []
    system = [{"role": "system", "content": args.system}] if args.system else []
    print("fulmine chat: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("[new conversation]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            answer, _ = _print_answer(llm, system + history, params)
        except ConfigError as error:  # e.g. the conversation outgrew the context window
            history.pop()
            print(f"fulmine: error: {error} (/reset starts a new conversation)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})
