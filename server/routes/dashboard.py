"""The dashboard: one static page for the admin (``server/dashboard``: HTML, JS and CSS shipped
in the package, no build step, nothing fetched from elsewhere). Loading it needs no token; the
page asks for the admin token, keeps it in the tab's sessionStorage and polls ROUTE_STATUS and
ROUTE_QUARANTINE with ``Authorization: Bearer`` (no cookie, no token in a URL)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from fedmobillm.device_runtime.messages import ROUTE_DASHBOARD
from fedmobillm.server.errors import NotFound

router = APIRouter(tags=["ops"])

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Only this server's own files run on the page: no inline script, no other origin.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> Response:
    data = files("fedmobillm.server").joinpath("dashboard", name).read_bytes()
    return Response(data, media_type=ASSETS[name], headers=HEADERS)


@router.get(ROUTE_DASHBOARD, response_class=HTMLResponse)
def dashboard() -> Response:
    """The admin dashboard: devices, samples, training curves, personal models, quarantine.
    It asks for the admin token and reads the admin JSON APIs with it."""
    return _asset("index.html")


@router.get(ROUTE_DASHBOARD + "/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise NotFound(f"no dashboard file {name!r}", hint=f"open {ROUTE_DASHBOARD}")
    return _asset(name)
