"""The browser playground: one static page at `/` and `/playground`, shipped inside the package.

The page (server/http/static: plain HTML, CSS and JavaScript, no build step, no CDN) is a client of the
public API like any other: chat completions for understanding and `/v1/generate` for images, both
streamed, with the user's API key on every call. So this module only serves three files; it knows
nothing about models or jobs, and nothing but these files is served without a key.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from server.http.common import error_response

# The page must work on an air-gapped cluster: the policy forbids every origin but this server's,
# so a stray external reference fails loudly in development instead of silently in production.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8"}


def _read(name: str) -> bytes:
    return resources.files("server.http").joinpath("static", name).read_bytes()


def add_playground_routes(app: FastAPI) -> None:
    page = _read("playground.html")
    assets = {name: _read(name) for name in ASSETS}  # read once: a missing file fails at start-up
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str) -> Response:
        if name not in assets:
            return error_response(404, f"no playground file named {name!r}")
        return Response(assets[name], media_type=ASSETS[name], headers=headers)
