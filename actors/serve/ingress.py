"""The HTTP front of the app: FastAPI routes that validate, authenticate and call deployments.

Why a separate ingress deployment: validation (schemas.py), the API key (auth.py) and metrics
run once here, on a cheap replica, while each model deployment scales on its own; a request
that fails validation never reaches a model. The FastAPI app is built per replica
(``__serve_build_asgi_app__``, after ``__init__``) so the key and the served names are the
replica's, not module globals. Overload is Serve's: a model deployment's full queue raises
``BackPressureError`` in the handle call, which Serve answers 503 with ``Retry-After`` (its
``backpressure_config``); the ingress itself is bounded the same way at the proxy. New
endpoints (QA, generation, classification) add a handle and a route here.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from bmray.actors.serve.auth import require_api_key
from bmray.actors.serve.deployments import MINILM
from bmray.actors.serve.generate import GenerationInputError
from bmray.actors.serve.metrics import RouteMetrics
from bmray.actors.serve.schemas import (MAX_BODY_BYTES, EmbedRequest, EmbedResponse, ErrorBody,
                                        GenerateRequest, GenerateResponse, Health, Hit,
                                        SearchRequest, SearchResponse)

# Documents the scheme in the OpenAPI schema; the check itself is the middleware (auth.py).
BEARER = HTTPBearer(auto_error=False, description="API key, when the app is configured with one")
UNPARSABLE = "There was an error parsing the body"     # FastAPI's detail for such a 400


def invalid_body() -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [{
        "type": "json_invalid", "loc": ["body"], "msg": "the body is not UTF-8 JSON",
        "input": None}]})


def unfit_request(exc: GenerationInputError) -> JSONResponse:
    """A valid body the model cannot take (e.g. past its context): 422 naming the field."""
    return JSONResponse(status_code=422, content={"detail": [{
        "type": "value_error", "loc": ["body", exc.field], "msg": exc.message, "input": None}]})


def sse(item: Any) -> str:
    """One server-sent event (the OpenAI streaming format: ``data: <json>``, a blank line)."""
    return f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n"


async def events(first: dict[str, Any], rest: DeploymentResponseGenerator) -> AsyncIterator[str]:
    """``first`` and the rest of a generation stream as events, then ``data: [DONE]``. If the
    client goes away Starlette cancels this; the replica's stream is cancelled with it."""
    done = False
    try:
        yield sse(first)
        async for item in rest:
            yield sse(item)
        done = True
        yield sse("[DONE]")
    finally:
        if not done:
            rest.cancel()


def guard_bodies(api: FastAPI) -> None:
    """Bodies no route could accept are 4xx before any parsing: over ``MAX_BODY_BYTES`` is 413,
    undecodable bytes are 422 like every other malformed body."""

    @api.exception_handler(UnicodeDecodeError)
    async def not_utf8(request: Request, exc: UnicodeDecodeError) -> JSONResponse:
        # FastAPI decodes some bodies before parsing JSON: bytes that are not UTF-8 were a 500.
        return invalid_body()

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers other undecodable bodies with a bare 400: one 422 for every bad body.
        if exc.status_code == 400 and exc.detail == UNPARSABLE:
            return invalid_body()
        return await http_exception_handler(request, exc)

    @api.middleware("http")
    async def bounded_body(request: Request,
                           call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Refuse a body larger than any valid request before reading it (413, RFC 9110).
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY_BYTES:
            return JSONResponse(status_code=413, content={
                "detail": f"body over {MAX_BODY_BYTES} bytes (Content-Length {size!r})"})
        return await call_next(request)


def make_api(search: DeploymentHandle | None, embed: DeploymentHandle | None,
             index_names: Sequence[str], api_key: str | None,
             generate: DeploymentHandle | None = None) -> FastAPI:
    """The FastAPI app over the given deployment handles (``None``: endpoint not served)."""
    names = sorted(index_names)
    api = FastAPI(title="bmray", version="1",
                  description="Search, embeddings and generation over bmray models (Ray Serve).")
    secured = [Depends(BEARER)] if api_key else []
    errors = {401: {"model": ErrorBody}, 404: {"model": ErrorBody},
              503: {"description": "overloaded: retry after the Retry-After seconds"}}

    @api.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", indexes=names, embed=embed is not None,
                      generate=generate is not None)

    @api.post("/v1/search", response_model=SearchResponse, dependencies=secured,
              responses=errors)
    async def search_route(req: SearchRequest) -> SearchResponse:
        if search is None or req.index not in names:
            raise HTTPException(404, f"unknown index {req.index!r}; available: {names}")
        hits = await search.search.remote(req.index, req.queries, req.k)
        return SearchResponse(index=req.index, k=req.k, results=[
            [Hit(id=doc_id, score=score) for doc_id, score in row] for row in hits])

    @api.post("/v1/embed", response_model=EmbedResponse, dependencies=secured,
              responses=errors)
    async def embed_route(req: EmbedRequest) -> EmbedResponse:
        if embed is None:
            raise HTTPException(404, "embeddings are not served by this app (embed.enabled)")
        vectors = await embed.embed.remote(req.texts)
        return EmbedResponse(model=MINILM, dim=len(vectors[0]), embeddings=vectors)

    @api.post("/v1/generate", response_model=GenerateResponse, dependencies=secured,
              responses={**errors, 200: {"content": {"text/event-stream": {}}, "description":
                                         "JSON, or with stream: true server-sent events"}})
    async def generate_route(req: GenerateRequest) -> Any:
        if generate is None:
            raise HTTPException(404, "generation is not served by this app (generate.enabled)")
        try:
            if not req.stream:
                return await generate.generate.remote(req.prompt, req.params())
            rest = generate.options(stream=True).stream.remote(req.prompt, req.params())
            first = await rest.__anext__()      # a request the model cannot take fails here
        except GenerationInputError as exc:
            return unfit_request(exc)
        return StreamingResponse(events(first, rest), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    guard_bodies(api)
    require_api_key(api, api_key)
    RouteMetrics().install(api)      # outermost: 401s are counted too
    return api


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """Routes to the search, embed and generate deployments (any may be ``None``)."""

    def __init__(self, search: DeploymentHandle | None, embed: DeploymentHandle | None,
                 index_names: Sequence[str], api_key: str | None,
                 generate: DeploymentHandle | None = None) -> None:
        self.search, self.embed, self.generate = search, embed, generate
        self.index_names, self.api_key = list(index_names), api_key

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.search, self.embed, self.index_names, self.api_key, self.generate)
