"""The review page: a small Starlette app over ReviewStore, served by uvicorn on 127.0.0.1.

Safety rules the routes follow:
  * image files are looked up by image id (a sha256 the lineage knows); no request parameter is
    ever joined into a filesystem path, and unknown or malformed ids get 404;
  * character, iteration and asset are validated as slugs / v<N> / a reviewable asset (else 404);
  * the Host header must be a loopback name, the bound host or an --allowed-host (DNS rebinding:
    never "any host", even when bound to 0.0.0.0);
  * POSTs must be JSON, carry this server's random session token (X-Flen-Token, embedded in the
    page it serves, so only a page this server served can decide) and, when the browser sends an
    Origin, come from the page's own origin;
  * static files come from a fixed table, not from the URL.
"""

from __future__ import annotations

import hmac
import html
import json
import secrets
from importlib import resources
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from flen_assets.project import InvalidNameError, Project
from flen_assets.review.store import STATUSES, Partition, ReviewStore, UnknownImage, review_command

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_HEADER = "X-Flen-Token"
MAX_PAGE = 500
MAX_IDS = 10_000
STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


def _asset_text(name: str, folder: str = "static") -> str:
    return resources.files("flen_assets.review").joinpath(folder, name).read_text()


def _not_found(message: str = "not found") -> JSONResponse:
    return JSONResponse({"error": message}, status_code=404, headers=SECURITY_HEADERS)


class Refused(Exception):
    """A request turned away; `response` says why."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


def _partition(request: Request) -> Partition:
    p = request.path_params
    return Partition.of(p["asset"], p["character"], p["iteration"])


def _page(items: list[dict], status: str, gate: str, sort: str, offset: int, limit: int) -> tuple[list[dict], int]:
    """Filter, sort and slice the items the way the page asks."""
    chosen = [i for i in items if (status == "all" or i["status"] == status)
              and (gate == "any" or (gate == "failed") != i["gate_passed"])]
    if sort in ("distance", "-distance"):
        missing = float("inf") if sort == "distance" else float("-inf")
        chosen.sort(key=lambda i: missing if i["distance"] is None else i["distance"], reverse=sort == "-distance")
    return chosen[offset:offset + limit], len(chosen)


def host_names(*hosts: str) -> list[str]:
    """The Host header forms of these names: lower case, IPv6 literals in brackets."""
    out = []
    for h in hosts:
        h = h.strip().lower()
        if h:
            out.append(f"[{h.strip('[]')}]" if ":" in h else h)
    return list(dict.fromkeys(out))


def create_app(project: Project, *, host: str = "127.0.0.1", port: int = 8765,
               store: ReviewStore | None = None, allowed_hosts: tuple[str, ...] | list[str] = (),
               token: str | None = None) -> Starlette:
    """The review app for one project. Host headers allowed: loopback names, `host` (the bound
    interface) and `allowed_hosts`; decision POSTs need `token` (random per app unless given)."""
    store = store or ReviewStore(project)
    allowed = host_names(*LOCAL_HOSTS, host, *allowed_hosts)
    token = token or secrets.token_urlsafe(32)

    def has_token(request: Request) -> bool:
        sent = request.headers.get(TOKEN_HEADER, "")
        return hmac.compare_digest(sent.encode(), token.encode())

    def json_response(data: Any, status_code: int = 200) -> Response:
        body = json.dumps(data, default=str, separators=(",", ":"))
        return Response(body, status_code=status_code, media_type="application/json",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True  # not a browser cross-site request (curl, tests); Host is already checked
        return urlsplit(origin).netloc == request.headers.get("host", "")

    async def read_json(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ValueError("send application/json")
        body = await request.body()
        if len(body) > 2_000_000:
            raise ValueError("request too large")
        data = json.loads(body or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def published(request: Request) -> Partition:
        """The request's partition when it is valid and materialized; Refused (404) otherwise, the
        same answer the page route gives."""
        try:
            part = _partition(request)
        except InvalidNameError:
            raise Refused(_not_found("unknown partition")) from None
        if not store.manifest_path(part).is_file():
            raise Refused(_not_found(f"{part.asset} {part.character}|{part.iteration} is not materialized"))
        return part

    async def post_body(request: Request) -> tuple[Partition, dict]:
        """The partition and JSON body of a decision POST; Refused carries the error response."""
        part = published(request)
        if not same_origin(request):
            raise Refused(json_response({"error": "cross-origin request refused"}, 403))
        if not has_token(request):
            raise Refused(json_response({"error": "missing or wrong session token: reload the page"}, 403))
        try:
            return part, await read_json(request)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            status = 415 if "application/json" in str(exc) else 400
            raise Refused(json_response({"error": str(exc)}, status)) from None

    def index(request: Request) -> Response:
        rows = []
        for part in store.partitions():
            counts = store.counts(store.items(part))
            url = f"/review/{part.character}/{part.iteration}/{part.asset}"
            rows.append(f"<tr><td><a href='{html.escape(url)}'>{html.escape(part.character)}</a></td>"
                        f"<td>{part.iteration}</td><td>{part.asset}</td><td class='num pending'>{counts['pending']}</td>"
                        f"<td class='num'>{counts['accepted']}</td><td class='num'>{counts['rejected']}</td>"
                        f"<td class='num'>{counts['all']}</td></tr>")
        table = ("<table class='index'><tr><th>character</th><th>iteration</th><th>asset</th><th>pending</th>"
                 "<th>accepted</th><th>rejected</th><th>all</th></tr>" + "".join(rows) + "</table>") if rows else \
            "<p>Nothing to review yet: materialize filtered_images or synthetic_batch first.</p>"
        page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>FLENwheel review</title>"
                f"<link rel='stylesheet' href='/static/review.css'></head><body class='index-page'>"
                f"<header><h1>FLENwheel review</h1><span class='where'>{html.escape(str(project.root))}</span></header>"
                f"<main class='index-main'>{table}</main></body></html>")
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    def review_page(request: Request) -> Response:
        try:
            part = published(request)
        except Refused as refused:
            return refused.response
        config = {"character": part.character, "iteration": part.iteration, "asset": part.asset,
                  "api": f"/api/review/{part.character}/{part.iteration}/{part.asset}",
                  "command": review_command(part.character, part.iteration, part.asset), "token": token}
        # Inside <script type=application/json>: escape '<' so no value can close the element.
        blob = json.dumps(config).replace("<", "\\u003c")
        page = _asset_text("review.html", "templates").replace("__CONFIG__", blob).replace(
            "__TITLE__", html.escape(f"{part.character} {part.iteration} · {part.asset}"))
        return HTMLResponse(page, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    def items(request: Request) -> Response:
        try:
            part = published(request)
        except Refused as refused:
            return refused.response
        q = request.query_params
        status = q.get("status", "pending")
        gate = q.get("gate", "any")
        sort = q.get("sort", "order")
        if status not in (*STATUSES, "all") or gate not in ("any", "failed", "passed") \
                or sort not in ("order", "distance", "-distance"):
            return json_response({"error": "bad filter"}, 400)
        try:
            offset = max(0, int(q.get("offset", 0)))
            limit = min(MAX_PAGE, max(1, int(q.get("limit", 100))))
        except ValueError:
            return json_response({"error": "offset and limit are integers"}, 400)
        all_items = store.items(part)
        page, total = _page(all_items, status, gate, sort, offset, limit)
        return json_response({"counts": store.counts(all_items), "total": total, "offset": offset, "limit": limit,
                              "items": page})

    async def decide(request: Request) -> Response:
        try:
            part, data = await post_body(request)
        except Refused as refused:
            return refused.response
        try:
            ids = data.get("ids")
            decision = data.get("decision")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > MAX_IDS:
                raise ValueError("ids must be a list of image ids")
            if decision not in ("accept", "reject", "clear"):
                raise ValueError("decision must be accept, reject or clear")
            reason = f"undo: {decision}" if data.get("undo") else ""  # empty: the store's default reason
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        from starlette.concurrency import run_in_threadpool

        try:
            previous = await run_in_threadpool(store.decide, part, ids, decision, reason)
        except UnknownImage as exc:
            return json_response({"error": str(exc)}, 404)
        return await run_in_threadpool(_decided, part, ids, previous)

    def _decided(part: Partition, ids: list[str], previous: list[dict]) -> Response:
        all_items = store.items(part)
        wanted = set(ids)
        changed = [{k: i[k] for k in ("id", "status", "human", "decided_by", "decided_at")}
                   for i in all_items if i["id"] in wanted]
        return json_response({"counts": store.counts(all_items), "items": changed, "previous": previous})

    async def bulk(request: Request) -> Response:
        try:
            part, data = await post_body(request)
        except Refused as refused:
            return refused.response
        try:
            decision, side, scope = data.get("decision"), data.get("side"), data.get("scope", "pending")
            score = float(data.get("score"))
            if decision not in ("accept", "reject") or side not in ("below", "above") or scope not in ("pending", "all"):
                raise ValueError("decision accept|reject, side below|above, scope pending|all")
        except (TypeError, ValueError) as exc:
            return json_response({"error": str(exc)}, 400)
        from starlette.concurrency import run_in_threadpool

        previous = await run_in_threadpool(store.bulk, part, decision, side, score, scope)
        return await run_in_threadpool(_decided, part, [p["id"] for p in previous], previous)

    def image_file(lookup: Callable[[str], Path], media_type: str) -> Callable[[Request], Response]:
        """A route serving the file `lookup(image_id)` finds (the store resolves ids, never the request)."""
        def route(request: Request) -> Response:
            try:
                path = lookup(request.path_params["image_id"])
            except UnknownImage:
                return _not_found("unknown image")
            return FileResponse(path, media_type=media_type, headers={**SECURITY_HEADERS, **IMMUTABLE})
        return route

    image = image_file(store.image_path, "image/png")
    thumb = image_file(store.thumbnail, "image/jpeg")

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _not_found()
        return Response(_asset_text(name), media_type=STATIC[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    def favicon(request: Request) -> Response:
        return Response(status_code=204)

    def health(request: Request) -> Response:
        return json_response({"ok": True, "project": str(project.root)})

    routes = [
        Route("/", index),
        Route("/healthz", health),
        Route("/favicon.ico", favicon),
        Route("/review/{character}/{iteration}/{asset}", review_page),
        Route("/api/review/{character}/{iteration}/{asset}/items", items),
        Route("/api/review/{character}/{iteration}/{asset}/decide", decide, methods=["POST"]),
        Route("/api/review/{character}/{iteration}/{asset}/bulk", bulk, methods=["POST"]),
        Route("/image/{image_id}", image),
        Route("/thumb/{image_id}", thumb),
        Route("/static/{name}", static),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _not_found()

    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)],
                    exception_handlers={404: not_found})
    app.state.store = store
    app.state.token = token
    return app


def serve(project: Project, host: str = "127.0.0.1", port: int = 8765,
          allowed_hosts: tuple[str, ...] | list[str] = ()) -> None:
    """Run the review page until interrupted. The lineage is compacted first: a table of thousands of
    one-decision files would make the first request slow (the store compacts again every 500 decisions)."""
    import uvicorn

    ReviewStore(project).lineage.compact()
    app = create_app(project, host=host, port=port, allowed_hosts=allowed_hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
