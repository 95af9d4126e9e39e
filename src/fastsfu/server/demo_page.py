"""The /demo page: a browser joins a voice channel with mediasoup-client over hRPC.

The page is static HTML; its bundle (static/demo.js) is built from the pinned npm packages in web/
by scripts/web_build.sh, which the README's set-up commands run (a wheel carries it when Node was
there at build time). Nothing minified is committed. Without the bundle /demo/ says so (503).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from fastsfu.rooms import RoomError

if TYPE_CHECKING:
    from fastsfu.rooms import Rooms

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "demo.html"
BUNDLE = STATIC / "demo.js"
NOT_BUILT = (
    "the /demo page is not available: its bundle (fastsfu/server/static/demo.js) was not built "
    "into this installation; build it from a checkout with scripts/web_build.sh (Node >= 18)"
)


def bundle_built() -> bool:
    """Whether the /demo page can work (its bundle is there): the server prints links only then."""
    return BUNDLE.is_file()


async def _page(request: web.Request) -> web.StreamResponse:
    if not bundle_built():
        # A page that would load a missing script is a dead link: say why instead. 503, as the
        # route exists but the service behind it is not available in this installation.
        body = f"<!doctype html><title>fastsfu demo not built</title><p>{NOT_BUILT}.</p>\n"
        return web.Response(status=503, text=body, content_type="text/html")
    return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})


async def _bundle(request: web.Request) -> web.StreamResponse:
    if not bundle_built():
        return web.Response(
            status=404,
            text=f"// {NOT_BUILT}\n",
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


def speaking_mount(rooms: Rooms, authenticate: Callable[[str], int]) -> Callable[[web.Application], None]:
    """GET /demo/speaking?guild=&channel= (Authorization: Bearer <token>): the user IDs speaking
    now in that room, for the demo page's indicators (docs/observers.md#speaking). Harmony's
    protocol has no speaking message, so the page asks here; only a member of the room may ask."""

    async def speaking(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        try:
            user_id = authenticate(token)
            key = (int(request.query["guild"]), int(request.query["channel"]))
        except (RoomError, KeyError, ValueError):  # a bad token, a missing or bad query: one answer
            return web.Response(status=403, text="not a member of this voice channel")
        room = rooms.get(key)
        if room is None or user_id not in room.members:
            return web.Response(status=403, text="not a member of this voice channel")
        body = json.dumps({"speaking": sorted(str(u) for u in room.speaking_users)})
        return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    def mount(app: web.Application) -> None:
        app.router.add_get("/demo/speaking", speaking)

    return mount
