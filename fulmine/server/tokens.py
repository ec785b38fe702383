"""The endpoints tools script against before they send a request: tokens counted and shown, and
the server's facts. POST /tokenize and /detokenize (vLLM's and llama-server's shapes), POST
/v1/messages/count_tokens (Anthropic's), POST /v1/responses/input_tokens (OpenAI's), GET /props
(llama-server's: the template, the context, what the model can do). A chat is counted as it would
run: templated with its tools and thinking switch, exactly the prompt a completion would get."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fulmine import __version__
from fulmine.server import messages, responses
from fulmine.server import protocol as p
from fulmine.server.completions import Completions

MAX_DETOKENIZE = 1 << 20  # token ids one /detokenize call may name


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True  # (always: a chat is counted as it runs)
    add_special_tokens: bool = True  # (a text is tokenized as /v1/completions reads it)
    with_pieces: bool = False  # llama-server: each token as {id, piece}
    return_token_strs: bool = False  # vLLM: the tokens' strings beside their ids


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[p.Int] = Field(max_length=MAX_DETOKENIZE)


async def tokenize(completions: Completions, body: TokenizeRequest) -> dict[str, Any]:
    model = body.model or completions.model_names[0]
    if (body.prompt is None) == (body.messages is None):
        raise p.RequestError("give a prompt (text) or messages (a chat), one of them", "prompt")
    if body.messages is not None:
        chat = {
            "model": model,
            "messages": body.messages,
            "tools": body.tools,
            "chat_template_kwargs": body.chat_template_kwargs,
            "reasoning_effort": body.reasoning_effort,
        }
        ids = (await completions.chat_prompt(_validated(p.ChatCompletionRequest, chat))).ids
    else:
        completions.check_model(model)
        assert body.prompt is not None
        p.check_unicode(body.prompt, "prompt")
        ids = await completions.encode(body.prompt, "prompt")
    out: dict[str, Any] = {"count": len(ids), "max_model_len": completions.max_model_len}
    if body.with_pieces or body.return_token_strs:
        pieces = await _in_thread(completions, lambda: [completions.token_text(t) for t in ids])
        out["tokens"] = [{"id": t, "piece": s} for t, s in zip(ids, pieces)] if body.with_pieces else ids
        if body.return_token_strs:
            out["token_strs"] = pieces
    else:
        out["tokens"] = ids
    return out


async def detokenize(completions: Completions, body: DetokenizeRequest) -> dict[str, Any]:
    completions.check_model(body.model or completions.model_names[0])
    vocab = completions.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise p.RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
    text = await _in_thread(completions, lambda: str(completions.tokenizer.decode(body.tokens)))
    return {"prompt": text, "content": text}  # vLLM's name, llama-server's


async def count_message_tokens(completions: Completions, body: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's count_tokens: the Messages request (no max_tokens needed) as it would be prompted."""
    request = _validated(messages.MessagesRequest, {"max_tokens": p.INT64_MAX, **body})
    return {"input_tokens": len((await completions.chat_prompt(messages.to_chat(request))).ids)}


async def count_response_tokens(
    completions: Completions, api: responses.Responses, body: dict[str, Any]
) -> dict[str, Any]:
    """OpenAI's input token count of a Responses request (its previous_response_id's turns included)."""
    request = _validated(responses.ResponsesRequest, body)
    history = api.store.get(request.previous_response_id) if request.previous_response_id else []
    count = len((await completions.chat_prompt(responses.to_chat(request, history))).ids)
    return {"object": "response.input_tokens", "input_tokens": count}


def props(completions: Completions) -> dict[str, Any]:
    engine = completions.engine.engine
    thinking = engine.reasoning
    return {
        "model": completions.model_names[0],
        "model_path": str(engine.source.path),
        "architecture": engine.model_config.architecture,
        "chat_template": completions.tokenizer.chat_template,
        "max_model_len": completions.max_model_len,
        "n_ctx": completions.max_model_len,  # (llama-server's name)
        "total_slots": engine.config.max_num_seqs,
        "modalities": {"vision": False, "audio": False},
        "capabilities": {
            "chat": completions.tokenizer.chat_template is not None,
            "tools": completions.tool_format,
            "structured_outputs": ["json_schema", "json_object", "regex", "choice", "grammar"],
            "reasoning": {"format": thinking.kind, "switch": thinking.switch},
            "embeddings": True,
        },
        "build_info": f"fulmine {__version__}",
    }


def _validated(model: type[Any], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValueError as error:
        raise p.RequestError(f"invalid request: {error}".splitlines()[0], None) from None


async def _in_thread(completions: Completions, work: Any) -> Any:
    """On the tokenizer thread: a long list of tokens decodes for milliseconds."""
    return await asyncio.get_running_loop().run_in_executor(completions.tokenizer_thread, work)
