"""A model's tokenizer: the Rust `tokenizers` model, its special tokens and its chat template.

`Tokenizer` holds a `tokenizers.Tokenizer` read straight from a tokenizer.json and offers the part
of transformers' tokenizer interface that fulmine uses (encode, decode, the special tokens' ids,
the vocabulary, the chat template), without importing transformers: a 262k-token vocabulary loads
in a third of the time and memory, and the object never changes after loading, so every thread
may use one (no copy per thread). A HF directory's tokenizer.json is read as is (a directory with
only a slow tokenizer goes through transformers once). A GGUF file's tokenizer is built from its
vocabulary on first use (gguf_tokenizer.py; transformers converts the kinds it does not build) and
saved under the user's cache directory, keyed by the file's identity.
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

from fulmine import chat_template as templates
from fulmine import gguf_tokenizer
from fulmine.config import ConfigError
from fulmine.models.source import ModelSource

Message = dict[str, Any]
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """The tokenizer interface fulmine uses (the names are transformers', so its tokenizers fit too)."""

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKENS and v}
        self.chat_template = chat_template
        # transformers' clean-up (spaces before punctuation) applies to WordPiece-like models, never BPE
        self.clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    # -- reading and writing -----------------------------------------------------------------
    @classmethod
    def from_directory(cls, path: Path) -> Tokenizer:
        """From tokenizer.json, tokenizer_config.json (special tokens, template, added tokens) and
        chat_template.jinja, as transformers saves them."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        legacy_file = path / "special_tokens_map.json"  # older repositories name them only there
        legacy = json.loads(legacy_file.read_text(encoding="utf-8")) if legacy_file.is_file() else {}
        named = {name: _content(config.get(name)) or _content(legacy.get(name)) for name in SPECIAL_TOKENS}
        special = {name: token for name, token in named.items() if token}
        missing = [  # added tokens a config declares and tokenizer.json lacks (transformers adds them too)
            entry
            for entry in (config.get("added_tokens_decoder") or {}).values()
            if isinstance(entry, dict) and backend.token_to_id(str(entry.get("content"))) is None
        ]
        for entry in missing:
            added = AddedToken(str(entry["content"]), normalized=bool(entry.get("normalized", False)))
            (backend.add_special_tokens if entry.get("special") else backend.add_tokens)([added])
        template: str | dict[str, str] | None = config.get("chat_template")
        if isinstance(template, list):  # several named templates
            template = {str(t.get("name")): str(t.get("template")) for t in template if isinstance(t, dict)}
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return cls(backend, special, template, bool(config.get("clean_up_tokenization_spaces", False)))

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> Tokenizer:
        """A transformers fast tokenizer's Rust model, special tokens and template."""
        from copy import copy

        return cls(
            copy(tokenizer.backend_tokenizer),
            {name: str(value) for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)},
            tokenizer.chat_template,
            bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        )

    def save(self, path: Path) -> None:
        """The three files `from_directory` reads (the layout transformers writes)."""
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {**self.special_tokens, "clean_up_tokenization_spaces": self.clean_up}
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if isinstance(self.chat_template, str):
            (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    def to_json(self) -> str:
        """The Rust model as tokenizer.json's text (llguidance builds its token trie from it)."""
        return str(self.backend.to_str())

    # -- tokens --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return _clean_up(text) if self.clean_up else text

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.backend.get_vocab(with_added_tokens=True))

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: int(i) for i, token in sorted(self.backend.get_added_tokens_decoder().items())}

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **variables: Any,
    ) -> str | list[int]:
        """The conversation as the model's template writes it (its token ids with `tokenize`);
        `variables`: the template's own, such as Qwen3's enable_thinking."""
        template = templates.pick(self.chat_template, tools)
        if template is None:
            raise ConfigError("this model has no chat template; use plain-text generation instead")
        text = templates.render(
            template, messages, tools, add_generation_prompt, **{**self.special_tokens, **variables}
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's fields."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _clean_up(text: str) -> str:
    """transformers' clean-up of WordPiece-style decoding (spaces before punctuation, contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for suffix in ("m", "s", "ve", "re"):
        text = text.replace(f" '{suffix}", f"'{suffix}")
    return text


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fulmine"


def cached_tokenizer_dir(gguf_path: Path) -> Path:
    """Where a GGUF file's converted tokenizer is cached, keyed by the file's identity."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / key


def load_tokenizer(source: ModelSource, progress: bool = False) -> Tokenizer:
    if source.gguf is None:
        if (source.path / "tokenizer.json").is_file():
            return Tokenizer.from_directory(source.path)
        from transformers import AutoTokenizer  # a slow tokenizer only: transformers converts it

        return Tokenizer.from_transformers(AutoTokenizer.from_pretrained(source.path))
    cached = cached_tokenizer_dir(source.path)
    if (cached / "tokenizer.json").is_file():
        return Tokenizer.from_directory(cached)
    if progress:
        print(
            f"fulmine: building the GGUF tokenizer (first use only; cached in {cached.parent})",
            file=sys.stderr,
            flush=True,
        )
    built = gguf_tokenizer.build(source.gguf)
    tokenizer = Tokenizer(*built) if built is not None else Tokenizer.from_transformers(_from_gguf(source))
    staging: Path | None = None
    try:  # write to a temp dir then rename, so a crash never leaves half a cache entry
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        tokenizer.save(staging)
        os.replace(staging, cached)
    except OSError:  # a read-only or raced cache is not an error: the tokenizer is in hand
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def _from_gguf(source: ModelSource) -> Any:
    """A GGUF file's tokenizer of a kind gguf_tokenizer.py does not build, converted by the tokenizer
    class transformers' AutoTokenizer picks for its family, called directly: AutoTokenizer first reads
    the whole file's metadata through gguf's reader to learn the model type (SmolLM2 4.4 s, Qwen2.5
    0.5B 10.9 s, Gemma 3 18.4 s here); the family already says it (0.3, 1.1, 3.9 s)."""
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
    try:  # (a model without a template: ConfigError from Tokenizer.apply_chat_template)
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        )
    except ConfigError:
        raise
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
    try:
        templates.check(text)
    except ConfigError as error:
        raise ConfigError(f"--chat-template {path}: {error}", "chat_template") from None
    tokenizer.chat_template = text
