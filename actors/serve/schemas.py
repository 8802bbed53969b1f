"""Request and response bodies of the HTTP API, with their limits.

Why here, as pydantic models: FastAPI validates every body against them before any model runs,
so a malformed request (missing or unknown field, wrong type, too long, ``k`` out of range, not
JSON at all) is a 422 whose ``detail[].loc`` names the field, never a 5xx. Strict mode: ``"5"``
is not an integer, unknown fields are refused (a misspelt ``top_k`` must not silently mean the
default ``k``). The limits bound the work one request may ask for; the later endpoints (QA,
generation) add their models here with ``max_new_tokens``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_TEXT_CHARS = 4096        # one query or text to embed
MAX_BATCH = 64               # queries or texts per request
MAX_K = 1000
MAX_NEW_TOKENS = 1024        # for the generation endpoints
MAX_STOPS = 4                # stop strings per generation request
MAX_STOP_CHARS = 64
MAX_TOP_K = 100_000
MAX_SEED = 2 ** 63 - 1
MAX_TEMPERATURE = 100.0
MAX_BODY_BYTES = 2 << 20     # > 64 x 4096 characters of 4-byte UTF-8 plus JSON: 413 beyond

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
IndexName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SearchRequest(Strict):
    index: IndexName = Field(description="name of a served index (see GET /healthz)")
    queries: list[Text] = Field(min_length=1, max_length=MAX_BATCH,
                                description="query texts, searched independently")
    k: int = Field(10, ge=1, le=MAX_K, description="hits per query")


class Hit(BaseModel):
    id: str
    score: float


class SearchResponse(BaseModel):
    index: str
    k: int
    results: list[list[Hit]] = Field(description="one ranked hit list per query, best first")


class EmbedRequest(Strict):
    texts: list[Text] = Field(min_length=1, max_length=MAX_BATCH)


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]] = Field(description="unit vectors, one per text")


class GenerateRequest(Strict):
    prompt: Text = Field(description="the text to continue")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    strategy: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description="sample: logits / temperature")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="sample: keep the k likeliest (0: off)")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                         description="sample: nucleus mass (1: off)")
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOPS,
        description="end the text where one of these appears (cut from the answer)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="sample: reproducible draws")
    stream: bool = Field(False, description="server-sent events as the tokens are produced")

    def params(self) -> dict[str, Any]:
        """The generation settings (``GenerationConfig`` keys) of the request."""
        return self.model_dump(exclude={"prompt", "stream"})


class GenerateResponse(BaseModel):
    text: str = Field(description="the continuation (without the prompt)")
    tokens: list[int] = Field(description="its token ids")
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: end of text or a stop string; length: max_new_tokens reached")


class Health(BaseModel):
    status: str
    indexes: list[str]
    embed: bool
    generate: bool = False


class ErrorBody(BaseModel):
    detail: str
