"""The chat page: ``GET /`` and its static files under ``/ui/``, shipped inside the package (docs/serve.md).

Plain HTML, CSS and JavaScript modules (the readable source is what is served: no build step, no CDN,
nothing fetched at run time). The files hold no secret: with ``--api-key`` the page asks the user for
the key and sends it on every API call it makes, so these routes are public like ``/health``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

UI_PREFIX = "/ui"
# What the page may load: only this server's own files, the API on the same origin, and the user's
# attachments as data: / blob: URLs. Model or user text that slipped through as HTML could not
# fetch anything from elsewhere or run an inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def ui_directory() -> Path:
    """The folder of the page's files inside the installed package."""
    return Path(str(resources.files("qwenvl.server").joinpath("ui")))


def is_ui_path(path: str) -> bool:
    """True for the page and its static files: public routes, like /health (no key needed)."""
    return path == "/" or path.startswith(UI_PREFIX + "/")


def install_ui(app: FastAPI) -> None:
    """Add ``GET /`` (the page) and ``/ui/*`` (its scripts, styles and icon) to ``app``."""
    directory = ui_directory()
    index = directory / "index.html"

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount(UI_PREFIX, StaticFiles(directory=directory), name="ui")
