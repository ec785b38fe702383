"""Tokenizers and chat templates, through transformers.

A HF directory's tokenizer loads as is. A GGUF file's tokenizer is converted by transformers once
and the result saved under the user's cache directory, keyed by the file's identity, so later
loads take a fraction of a second instead of several.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fulmine.config import ConfigError
from fulmine.models.source import ModelSource

Message = dict[str, Any]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fulmine"


def cached_tokenizer_dir(gguf_path: Path) -> Path:
    """Where a GGUF file's converted tokenizer is cached, keyed by the file's identity."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / key


def load_tokenizer(source: ModelSource, progress: bool = False) -> Any:
    from transformers import AutoTokenizer  # deferred: importing transformers costs about a second

    if source.gguf is None:
        return AutoTokenizer.from_pretrained(source.path)
    cached = cached_tokenizer_dir(source.path)
    if (cached / "tokenizer.json").is_file():
        return load_cached_tokenizer(cached)
    if progress:
        print(
            f"fulmine: converting the GGUF tokenizer (first use only; cached in {cached.parent})",
            file=sys.stderr,
            flush=True,
        )
    tokenizer = _from_gguf(source)
    staging: Path | None = None
    try:  # write to a temp dir then rename, so a crash never leaves half a cache entry
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        tokenizer.save_pretrained(staging)
        os.replace(staging, cached)
    except OSError:  # a read-only or raced cache is not an error: the tokenizer is in hand
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def _from_gguf(source: ModelSource) -> Any:
    """A GGUF file's tokenizer, converted by the tokenizer class transformers' AutoTokenizer picks for
    its family, called directly: AutoTokenizer first reads the whole file's metadata through gguf's
    reader to learn the model type (SmolLM2 4.4 s, Qwen2.5 0.5B 10.9 s, Gemma 3 18.4 s here); the
    family already says it (0.3, 1.1, 3.9 s). The same tokenizer (tests compare it with AutoTokenizer's)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    name = TOKENIZER_MAPPING_NAMES.get(source.family.model_type) or "TokenizersBackend"
    tokenizer_class = tokenizer_class_from_name(name)
    if tokenizer_class is not None:
        try:
            return tokenizer_class.from_pretrained(source.path.parent, gguf_file=source.path.name)
        except Exception:  # noqa: BLE001 (a transformers without that path: its own, slower way)
            pass
    return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)


def load_cached_tokenizer(path: Path) -> Any:
    """A converted tokenizer from fulmine's cache: the Rust tokenizer read from its file, wrapped with
    its special tokens and chat template. AutoTokenizer rebuilds it through the model's Python class
    (Gemma 3's 262k-token vocabulary: 2.5 s, this 1.1 s; handing over a Tokenizer object instead of the
    file costs a deep copy, 1.2 s more); the result is the same."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((path / "tokenizer_config.json").read_text())
    special = {name: config[name] for name in _SPECIAL_TOKENS if config.get(name) is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    template = path / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text()
    return tokenizer


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def apply_chat_template(
    tokenizer: Any,
    messages: list[Message],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of the conversation, ending with the assistant's turn opened (the tools, if any,
    rendered by the template's own tool section; `template_kwargs`: the template's own variables,
    such as Qwen3's enable_thinking)."""
    if not messages:
        raise ConfigError("messages must not be empty")
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ConfigError(f"unknown message role {message.get('role')!r}")
        if not isinstance(message.get("content", ""), str):
            raise ConfigError("message content must be a string")
    if tokenizer.chat_template is None:
        raise ConfigError("this model has no chat template; use plain-text generation instead")
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        )
    except Exception as error:  # noqa: BLE001 (jinja raising on a conversation the template refuses)
        raise ConfigError(f"the model's chat template cannot render these messages: {error}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(
    tokenizer: Any,
    prompt: str | list[int] | list[Message],
    vocab_size: int,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a prompt: a text, a list of token ids (checked), or chat messages (templated)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if prompt and all(isinstance(m, dict) for m in prompt):
        return apply_chat_template(tokenizer, prompt, tools, template_kwargs)  # type: ignore[arg-type]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids: list[int] = list(prompt)  # type: ignore[arg-type]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return ids
    raise ConfigError("a prompt is a string, a list of token ids, or a list of chat messages")


MAX_TEMPLATE_BYTES = 256 * 1024


def use_template(tokenizer: Any, path: str) -> None:
    """Serve with the chat template in `path` instead of the model's (--chat-template): read, bounded,
    its syntax checked now, so a broken file is a startup error and not every request's."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--chat-template {path}: no such file", "chat_template")
    if file.stat().st_size > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"--chat-template {path}: larger than {MAX_TEMPLATE_BYTES // 1024} KB", "chat_template")
    text = file.read_text(encoding="utf-8")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as error:
        raise ConfigError(f"--chat-template {path}: line {error.lineno}: {error.message}", "chat_template") from None
    tokenizer.chat_template = text
