"""Request and response bodies of the HTTP API, with their limits.

Why here, as pydantic models: FastAPI validates every body against them before any model runs,
so a malformed request (missing or unknown field, wrong type, too long, ``k`` out of range, not
JSON at all) is a 422 whose ``detail[].loc`` names the field, never a 5xx. Strict mode: ``"5"``
is not an integer, unknown fields are refused (a misspelt ``top_k`` must not silently mean the
default ``k``). The limits bound the work one request may ask for; the later endpoints (QA,
generation) add their models here with ``max_new_tokens``.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_TEXT_CHARS = 4096        # one query or text to embed
MAX_BATCH = 64               # queries or texts per request
MAX_K = 1000
MAX_NEW_TOKENS = 1024        # for the generation endpoints
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


class Health(BaseModel):
    status: str
    indexes: list[str]
    embed: bool


class ErrorBody(BaseModel):
    detail: str
