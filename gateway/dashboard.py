"""The cost dashboard and its JSON, served by the gateway (and by `fleet dashboard`):

    GET  /dashboard          the page: spend, saving, tiers, latency, live state (HTML,
                             rendered here, no script, charts as inline SVG)
    POST /dashboard/login    a key given once on the login form opens a session
    POST /dashboard/logout   ends it
    GET  /api/usage          `fleet usage --json`'s rows and their total, same filters

Who sees what: an admin key (`fleet keys create NAME --admin`) the whole fleet; an app's
key its own app only (its filters are forced to it; asking for another app is a 403).
Scripts send the key as `Authorization: Bearer`, as on every route. A person gives it
once on the form (a POST: never in a URL); the browser then holds a random session id in
an HttpOnly, SameSite=Strict cookie, and the state Redis holds, under the id's SHA-256,
the key's id (never the key) for SESSION_S. Each request reads the key by that id through
the key store's cache, so a revoked key's sessions stop within its CACHE_S (2 s).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from client.dispatch import current_catalog
from gateway.dashboard_data import (
    PRESETS,
    TIER_COLOURS,
    BadFilter,
    View,
    WorkersCache,
    api_usage,
    ledger_figures,
    live_state,
    parse_view,
)
from gateway.errors import APIError
from gateway.keys import AppKey
from router.catalog import TASK_CLASSES
from workers.state import keys

COOKIE = "fleet_session"
SESSION_S = 8 * 3600
MAX_FORM_BYTES = 4096

_templates = Environment(
    loader=PackageLoader("gateway", "templates"),
    autoescape=select_autoescape(default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def usd(value: float) -> str:
    """Dollars to the millionth, the sign first: -$0.5, and no -$0.000000 for a saving
    of -0.0 or less than half a millionth."""
    shown = f"{abs(value):,.6f}"
    return f"-${shown}" if value < 0 and shown.strip("0.,") else f"${shown}"


_templates.filters.update(
    usd=usd,
    num=lambda v: f"{v:,}",
    pct=lambda v: f"{v * 100:.1f}%",
    ms=lambda v: "–" if v is None else f"{v:,.0f} ms",
)
_workers = WorkersCache()


def routes() -> list[BaseRoute]:
    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/login", login, methods=["POST"]),
        Route("/dashboard/logout", logout, methods=["POST"]),
        Route("/api/usage", usage_api, methods=["GET"]),
    ]


def _gw(request: Request) -> Any:
    return request.app.state.gateway


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _session_key(gw: Any, session_id: str) -> AppKey | None:
    key_id = gw.redis.get(keys.dashboard_session(_digest(session_id)))
    if key_id is None:
        return None
    found: AppKey | None = gw.keys.active(key_id.decode())
    return found


async def viewer(request: Request) -> AppKey | None:
    """The key behind the request: its bearer header (401 if bad), else its session
    cookie (None when there is none, or it ended or its key was revoked)."""
    gw = _gw(request)
    if "authorization" in request.headers:
        found: AppKey = await gw.key_of(request)
        return found
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return None
    session: AppKey | None = await gw.blocking(_session_key, gw, session_id)
    return session


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(**context)
    headers = {
        "cache-control": "no-store",
        # Nothing but this origin, no script at all: the page works offline by design.
        "content-security-policy": "default-src 'none'; style-src 'unsafe-inline';"
        " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        "referrer-policy": "same-origin",  # (no-referrer would make the forms' Origin "null")
    }
    return HTMLResponse(html, status_code=status, headers=headers)


def _login_page(status: int, message: str | None, back: str) -> HTMLResponse:
    """The login form; `back`: the query string of the page to return to."""
    return _render("login.html", status, message=message, next=back)


def _link(query: dict[str, str], **change: str | None) -> str:
    merged = {**query, **change}
    if "since" in change or "from" in change:  # a new window replaces the old one whole
        for k in ("since", "until", "from", "to"):
            if k not in change:
                merged.pop(k, None)
    return "/dashboard?" + urlencode({k: v for k, v in merged.items() if v})


async def page(request: Request) -> Response:
    key = await viewer(request)
    if key is None:
        message = "the session ended: give the key again" if COOKIE in request.cookies else None
        return _login_page(401, message, request.url.query)
    gw = _gw(request)
    catalog = current_catalog()
    app = None if key.admin else key.app
    try:
        view = parse_view(dict(request.query_params), catalog, app)
    except BadFilter as exc:
        return _render("error.html", 400, message=str(exc))
    except PermissionError as exc:
        return _render("error.html", 403, message=str(exc))
    from workers.runtime.celery_app import get_app
    from workers.state.limits import FleetState

    state = FleetState(gw.redis, catalog)
    figures, live = await asyncio.gather(
        gw.blocking(ledger_figures, gw.keys.ledger, view, catalog),
        gw.blocking(live_state, state, catalog, get_app(), _workers, app),
    )
    return _render(
        "dashboard.html",
        key=key,
        view=view,
        page=figures,
        live=live,
        presets=PRESETS,
        catalog=catalog,
        task_classes=TASK_CLASSES,
        colours=TIER_COLOURS,
        link=lambda **change: _link(view.query, **change),
    )


async def usage_api(request: Request) -> Response:
    key = await viewer(request)
    if key is None:
        raise APIError(
            401,
            "no key: send 'Authorization: Bearer <key>' or log in at /dashboard",
            code="missing_key",
        )
    catalog = current_catalog()
    try:
        view: View = parse_view(dict(request.query_params), catalog, None if key.admin else key.app)
    except BadFilter as exc:
        raise APIError(400, str(exc), code="invalid_filter") from None
    except PermissionError as exc:
        raise APIError(403, str(exc), code="other_app") from None
    gw = _gw(request)
    return JSONResponse(await gw.blocking(api_usage, gw.keys.ledger, view, catalog))


def _same_origin(request: Request) -> None:
    """A form posted from another site is refused (the cookie's SameSite=Strict keeps it
    from being sent too; this also covers the login form, which has no cookie yet)."""
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
        raise APIError(403, "a form from another origin is refused", code="cross_origin")


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise APIError(413, f"the form is larger than {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _open_session(gw: Any, key: AppKey) -> str:
    session_id = secrets.token_urlsafe(32)
    gw.redis.set(keys.dashboard_session(_digest(session_id)), key.key_id, ex=SESSION_S)
    return session_id


def _back_to(query: str) -> str:
    """/dashboard with the filters the login form came from (its query string only)."""
    fields = [
        (k, v)
        for k, v in parse_qsl(query)
        if k in ("since", "until", "from", "to", "class", "app", "model")
    ]
    return "/dashboard" + (f"?{urlencode(fields)}" if fields else "")


async def login(request: Request) -> Response:
    _same_origin(request)
    gw = _gw(request)
    form = await _form(request)
    presented = form.get("key", "").strip()
    if not presented:
        return _login_page(401, "give a key (fleet keys create NAME)", form.get("next", ""))
    found = await gw.blocking(gw.keys.verify, presented)
    if found is None:
        return _login_page(401, "the key is unknown or revoked", form.get("next", ""))
    session_id = await gw.blocking(_open_session, gw, found)
    response = RedirectResponse(_back_to(form.get("next", "")), status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=SESSION_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    _same_origin(request)
    gw = _gw(request)
    session_id = request.cookies.get(COOKIE)
    if session_id:
        await gw.blocking(gw.redis.delete, keys.dashboard_session(_digest(session_id)))
    response = RedirectResponse("/dashboard", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
