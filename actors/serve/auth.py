"""Bearer API-key check for the HTTP API.

Why: Serve's HTTP proxy checks nothing (Ray's own token guards the cluster, not the app's port),
so an app bound beyond localhost must check callers itself. With a key configured every path but
the open ones (health, the OpenAPI schema and its docs page) needs ``Authorization: Bearer
<key>``; a missing or wrong key is 401 with ``WWW-Authenticate: Bearer`` (RFC 6750). The
comparison is ``hmac.compare_digest`` (constant time: no timing oracle on the key's prefix). It
runs as middleware, before the body is parsed, so an unauthenticated caller learns nothing from
validation errors either.
"""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})


def app_path(request: Request) -> str:
    """The request's path inside the app (without Serve's route prefix / ``root_path``)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def key_matches(header: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


def unauthorized(reason: str) -> Response:
    return JSONResponse({"detail": reason}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="bmray"'})


def require_api_key(app: FastAPI, key: str | None) -> None:
    """Guard every path of ``app`` but ``OPEN_PATHS`` with ``key`` (nothing when ``None``)."""
    if key is None:
        return

    @app.middleware("http")
    async def check_key(request: Request,
                        call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if app_path(request) in OPEN_PATHS:
            return await call_next(request)
        header = request.headers.get("authorization")
        if not header:
            return unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if not key_matches(header, key):
            return unauthorized("invalid API key")
        return await call_next(request)
