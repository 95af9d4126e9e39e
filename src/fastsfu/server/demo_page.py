"""The /demo page: a browser joins a voice channel with mediasoup-client over hRPC.

The page is static HTML; its bundle (static/demo.js) is built from the pinned npm packages in web/
by scripts/web_build.sh, which the README's set-up commands run. Nothing minified is committed.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "demo.html"
BUNDLE = STATIC / "demo.js"


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})


async def _bundle(request: web.Request) -> web.StreamResponse:
    if not BUNDLE.is_file():
        return web.Response(
            status=404,
            text="// demo.js is not built: run scripts/web_build.sh (make serve does)\n",
            content_type="application/javascript",
        )
    return web.FileResponse(BUNDLE, headers={"Cache-Control": "no-cache"})


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/demo/")


def mount_demo(app: web.Application) -> None:
    """Add GET /demo/ (the page) and /demo/demo.js (the bundle) to the hRPC app."""
    app.router.add_get("/demo", _redirect)
    app.router.add_get("/demo/", _page)
    app.router.add_get("/demo/demo.js", _bundle)
