"""POST /v1/embeddings: OpenAI's embeddings endpoint on the served model, as llama-server and Ollama
offer for any model: each input's final hidden states pooled (mean by default, or the last token's:
`pooling`, an extension) and L2-normalized (`normalize: false` to keep the raw pool)."""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fulmine.config import ConfigError
from fulmine.server import protocol as p
from fulmine.server.completions import Completions

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    input: str | list[str] | list[p.Int] | list[list[p.Int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: p.Int | None = Field(None, ge=1)
    user: str | None = None
    # extensions
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = True

    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str):
            items: list[Any] = [value]
        elif value and all(isinstance(v, int) for v in value):
            items = [list(value)]  # one prompt as token ids
        else:
            items = list(value)
        if not items:
            raise p.RequestError("input must not be empty", "input")
        if len(items) > MAX_INPUTS:
            raise p.RequestError(f"at most {MAX_INPUTS} inputs per request", "input")
        if any(item == "" or item == [] for item in items):
            raise p.RequestError("an input must not be empty", "input")
        return items


async def create(completions: Completions, body: EmbeddingRequest) -> dict[str, Any]:
    p.check_unicode(body.model_dump(exclude_none=True))
    completions.check_model(body.model)
    width = completions.engine.engine.model_config.hidden_size
    if body.dimensions is not None and body.dimensions != width:
        raise p.RequestError(
            f"this model's embeddings have {width} dimensions; dimensions cannot change that", "dimensions"
        )
    data, prompt_tokens = [], 0
    for index, item in enumerate(body.inputs()):
        prompt_ids = await completions.encode(item, "input")
        try:
            vector = await completions.engine.embed(prompt_ids, body.pooling, body.normalize)
        except ConfigError as error:
            if "retry" in str(error):
                raise p.RequestError(
                    str(error), code="rate_limit_exceeded", status=429, error_type="rate_limit_error"
                ) from None
            raise p.RequestError(str(error), error.param or "input") from None
        prompt_tokens += len(prompt_ids)
        embedding: Any = vector
        if body.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}
