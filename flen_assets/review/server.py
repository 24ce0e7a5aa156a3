"""The review page: a small Starlette app over ReviewStore, served by uvicorn on 127.0.0.1.

Where things are: `ReviewApp` holds the route handlers and the guards they share (`has_token`,
`published`, `post_body`); stateless checks (`same_origin`, `read_json`, `read_body`, `parse_object`,
`_filters`, `_decision`, `_bulk_decision`) and page builders are module functions; `create_app`
wires a ReviewApp into Starlette behind the Host check; `serve` runs it with uvicorn.

Safety rules the routes follow:
  * image files are looked up by image id (a sha256 the lineage knows); no request parameter is
    ever joined into a filesystem path, and unknown or malformed ids get 404;
  * character, iteration and asset are validated as slugs / v<N> / a reviewable asset (else 404);
  * the Host header must be a loopback name, the bound host or an --allowed-host (DNS rebinding:
    never "any host", even when bound to 0.0.0.0);
  * POSTs must be JSON, carry this server's random session token (X-Flen-Token, embedded in the
    page it serves, so only a page this server served can decide) and, when the browser sends an
    Origin, come from the page's own origin;
  * a POST body is never buffered past MAX_BODY (413: by its Content-Length before a byte is read,
    or as soon as a chunked body passes the limit); malformed or too deeply nested JSON gets 400;
  * image files are decoded with the safe decoder before they are served or thumbnailed: a file
    that is not a decodable image (a text file named .png, a truncated JPEG) gets 415, never 500;
  * static files come from a fixed table, not from the URL.
"""

from __future__ import annotations

import hmac
import html
import json
import math
import secrets
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from flen_assets.review.store import STATUSES, Partition, ReviewStore, UnknownImage, apply_command, review_command
from flen_resources.imaging import ImageRejected, decode_image
from flen_resources.project import InvalidNameError, Project, flen_command, iteration_number

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_HEADER = "X-Flen-Token"
MAX_PAGE = 500
MAX_IDS = 10_000
MAX_BODY = 2_000_000  # bytes of a decision POST: 10,000 ids of 64 hex characters fit with room to spare
THUMB_SIDE = 256
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
    """A file shipped in the package (static/ or templates/)."""
    return resources.files("flen_assets.review").joinpath(folder, name).read_text()


def _not_found(message: str = "not found") -> JSONResponse:
    """A JSON 404 with the security headers."""
    return JSONResponse({"error": message}, status_code=404, headers=SECURITY_HEADERS)


class Refused(Exception):
    """A request turned away; `response` says why."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


class BadBody(ValueError):
    """A POST body refused: `status` is 400 (malformed), 413 (too large) or 415 (not JSON)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _declared_length(request: Request) -> int | None:
    """The body length the client declared in Content-Length; None for a chunked body."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():  # uvicorn refuses these first; a bare ASGI server might not
        raise BadBody("malformed Content-Length")
    return int(raw)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, never buffered past `limit` (BadBody 413 otherwise)."""
    # Refuse by the declared length before a byte is read; a chunked body declares none, so count as it comes.
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise BadBody(f"request body over {limit} bytes", 413)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadBody(f"request body over {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(body: bytes) -> dict:
    """The JSON object `body` holds (empty: {}); BadBody (400) for anything else."""
    try:
        data = json.loads(body or b"{}")
    except RecursionError:  # '[' * 100_000: the parser recurses once per level
        raise BadBody("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer with too many digits
        raise BadBody(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadBody("expected a JSON object")
    return data


def _score(value: Any) -> float:
    """A bulk decision's distance: a finite JSON number (not a string, bool or 1e400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("score must be a number")
    try:
        score = float(value)
    except OverflowError:  # a JSON integer too large for a float
        raise ValueError("score must be a finite number") from None
    if not math.isfinite(score):
        raise ValueError("score must be a finite number")
    return score


def _media_type(image_format: str) -> str:
    """The Content-Type of a Pillow format (read after decoding: Pillow fills Image.MIME lazily)."""
    if image_format == "MPO":  # a camera JPEG with a second frame: browsers know it as a JPEG
        return "image/jpeg"
    return Image.MIME.get(image_format, "application/octet-stream")


@lru_cache(maxsize=8192)
def _image_verdict(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """(media type, "") of a decodable image file, ("", rejection code) otherwise."""
    # Cached per file version so a page going back and forth decodes each image once; codes, not
    # exceptions, because a cached traceback would keep the file's bytes alive.
    try:
        decoded = decode_image(Path(path))
    except ImageRejected as exc:
        return "", exc.code
    return _media_type(decoded.format), ""


def checked_image(path: Path) -> str:
    """The media type of `path` once the safe decoder has read it; ImageRejected when it cannot."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageRejected(path, "unreadable", f"cannot read file ({exc.strerror})") from None
    media_type, code = _image_verdict(str(path), st.st_size, st.st_mtime_ns)
    if code:
        raise ImageRejected(path, code, "not a decodable image")
    return media_type


def _partition(request: Request) -> Partition:
    """The partition the URL names; InvalidNameError when a part is not a valid name."""
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


# -- request guards that need no app state ------------------------------------------------------
def json_response(data: Any, status_code: int = 200) -> Response:
    """A JSON answer that is never cached, with the security headers."""
    body = json.dumps(data, default=str, separators=(",", ":"))
    return Response(body, status_code=status_code, media_type="application/json",
                    headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def same_origin(request: Request) -> bool:
    """False only when a browser says the request comes from another origin than this page's."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser cross-site request (curl, tests); Host is already checked
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def read_json(request: Request) -> dict:
    """The JSON object a POST carries; BadBody says why not (415, 413 or 400)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadBody("send application/json", 415)
    return parse_object(await read_body(request))


def _filters(query: Mapping[str, str]) -> tuple[str, str, str, int, int]:
    """(status, gate, sort, offset, limit) of an items query; ValueError with the 400 message."""
    status = query.get("status", "pending")
    gate = query.get("gate", "any")
    sort = query.get("sort", "order")
    if status not in (*STATUSES, "all") or gate not in ("any", "failed", "passed") \
            or sort not in ("order", "distance", "-distance"):
        raise ValueError("bad filter")
    try:
        offset = max(0, int(query.get("offset", 0)))
        limit = min(MAX_PAGE, max(1, int(query.get("limit", 100))))
    except ValueError:
        raise ValueError("offset and limit are integers") from None
    return status, gate, sort, offset, limit


def _decision(data: dict) -> tuple[list[str], str, str]:
    """(ids, decision, reason) of a decide POST; ValueError with the 400 message."""
    ids = data.get("ids")
    decision = data.get("decision")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > MAX_IDS:
        raise ValueError("ids must be a list of image ids")
    if decision not in ("accept", "reject", "clear"):
        raise ValueError("decision must be accept, reject or clear")
    reason = f"undo: {decision}" if data.get("undo") else ""  # empty: the store's default reason
    return ids, decision, reason


def _bulk_decision(data: dict) -> tuple[str, str, float, str]:
    """(decision, side, score, scope) of a bulk POST; TypeError or ValueError with the 400 message."""
    decision, side, scope = data.get("decision"), data.get("side"), data.get("scope", "pending")
    if decision not in ("accept", "reject") or side not in ("below", "above") or scope not in ("pending", "all"):
        raise ValueError("decision accept|reject, side below|above, scope pending|all")
    return decision, side, _score(data.get("score")), scope


def _index_html(project: Project, store: ReviewStore) -> str:
    """The index page: one row per published partition with its counts."""
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
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>FLENwheel review</title>"
            f"<link rel='stylesheet' href='/static/review.css'></head><body class='index-page'>"
            f"<header><h1>FLENwheel review</h1><span class='where'>{html.escape(str(project.root))}</span></header>"
            f"<main class='index-main'>{table}</main></body></html>")


def _apply_text(project: Project, part: Partition) -> tuple[str, str]:
    """(command, what follows it) that makes the page's decisions count: decisions are lineage rows,
    and the published partition (its manifest, its check, the training set) takes them only when
    materialized again."""
    command = apply_command(project, part.character, part.iteration, part.asset)
    if part.asset == "synthetic_batch":
        nxt = f"v{iteration_number(part.iteration) + 1}"
        return command, (f"then training set {nxt} takes the accepted generations: "
                         f"{flen_command(project, 'iterate', part.character)}")
    return command, "then the training set is built again with them"


def _review_html(project: Project, store: ReviewStore, part: Partition, token: str) -> str:
    """One partition's review page, its config (and this server's token) embedded for review.js.

    It opens on the pending images, or on all of them when none is pending (an empty view would
    greet the reviewer with nothing to look at)."""
    apply, then = _apply_text(project, part)
    config = {"character": part.character, "iteration": part.iteration, "asset": part.asset,
              "api": f"/api/review/{part.character}/{part.iteration}/{part.asset}",
              "command": review_command(project, part.character, part.iteration, part.asset),
              "apply_command": apply, "apply_then": then,
              "initial_status": "pending" if store.pending(part) else "all", "token": token}
    # Inside <script type=application/json>: escape '<' so no value can close the element.
    blob = json.dumps(config).replace("<", "\\u003c")
    return _asset_text("review.html", "templates").replace("__CONFIG__", blob).replace(
        "__TITLE__", html.escape(f"{part.character} {part.iteration} · {part.asset}"))


class ReviewApp:
    """One project's route handlers and the guards they share (token, partition, decision POST)."""

    def __init__(self, project: Project, store: ReviewStore, token: str):
        self.project = project
        self.store = store
        self.token = token

    def routes(self) -> list[Route]:
        """Every URL the app answers; anything else is a 404."""
        return [
            Route("/", self.index),
            Route("/healthz", self.health),
            Route("/favicon.ico", self.favicon),
            Route("/review/{character}/{iteration}/{asset}", self.review_page),
            Route("/api/review/{character}/{iteration}/{asset}/items", self.items),
            Route("/api/review/{character}/{iteration}/{asset}/decide", self.decide, methods=["POST"]),
            Route("/api/review/{character}/{iteration}/{asset}/bulk", self.bulk, methods=["POST"]),
            Route("/image/{image_id}", self.image),
            Route("/thumb/{image_id}", self.thumb),
            Route("/static/{name}", self.static),
        ]

    # -- guards ---------------------------------------------------------------------------------
    def has_token(self, request: Request) -> bool:
        """Whether the request carries this server's session token (compared in constant time)."""
        sent = request.headers.get(TOKEN_HEADER, "")
        return hmac.compare_digest(sent.encode(), self.token.encode())

    def published(self, request: Request) -> Partition:
        """The request's valid, materialized partition; Refused (404, as for the page) otherwise."""
        try:
            part = _partition(request)
        except InvalidNameError:
            raise Refused(_not_found("unknown partition")) from None
        if not self.store.manifest_path(part).is_file():
            raise Refused(_not_found(f"{part.asset} {part.character}|{part.iteration} is not materialized"))
        return part

    async def post_body(self, request: Request) -> tuple[Partition, dict]:
        """The partition and JSON body of a decision POST; Refused carries the error response."""
        part = self.published(request)
        if not same_origin(request):
            raise Refused(json_response({"error": "cross-origin request refused"}, 403))
        if not self.has_token(request):
            raise Refused(json_response({"error": "missing or wrong session token: reload the page"}, 403))
        try:
            return part, await read_json(request)
        except BadBody as exc:
            raise Refused(json_response({"error": str(exc)}, exc.status)) from None

    # -- pages ----------------------------------------------------------------------------------
    def index(self, request: Request) -> Response:
        """The list of partitions to review."""
        return HTMLResponse(_index_html(self.project, self.store), headers=SECURITY_HEADERS)

    def review_page(self, request: Request) -> Response:
        """One partition's review page."""
        try:
            part = self.published(request)
        except Refused as refused:
            return refused.response
        return HTMLResponse(_review_html(self.project, self.store, part, self.token), headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    def static(self, request: Request) -> Response:
        """review.js or review.css, from the fixed STATIC table (the URL names a key, never a path)."""
        name = request.path_params["name"]
        if name not in STATIC:
            return _not_found()
        return Response(_asset_text(name), media_type=STATIC[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    def favicon(self, request: Request) -> Response:
        """No icon (a 204 keeps browsers from logging a 404)."""
        return Response(status_code=204)

    def health(self, request: Request) -> Response:
        """Liveness, and which project this server reviews."""
        return json_response({"ok": True, "project": str(self.project.root)})

    # -- API ------------------------------------------------------------------------------------
    def items(self, request: Request) -> Response:
        """A page of a partition's items, filtered and sorted as the query asks, with its counts."""
        try:
            part = self.published(request)
        except Refused as refused:
            return refused.response
        try:
            status, gate, sort, offset, limit = _filters(request.query_params)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        all_items = self.store.items(part)
        page, total = _page(all_items, status, gate, sort, offset, limit)
        return json_response({"counts": self.store.counts(all_items), "total": total, "offset": offset,
                              "limit": limit, "items": page})

    async def decide(self, request: Request) -> Response:
        """Accept, reject or clear a list of images."""
        try:
            part, data = await self.post_body(request)
        except Refused as refused:
            return refused.response
        try:
            ids, decision, reason = _decision(data)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        try:
            previous = await run_in_threadpool(self.store.decide, part, ids, decision, reason)
        except UnknownImage as exc:
            return json_response({"error": str(exc)}, 404)
        return await run_in_threadpool(self._decided, part, ids, previous)

    async def bulk(self, request: Request) -> Response:
        """Accept or reject every image below or above an identity distance."""
        try:
            part, data = await self.post_body(request)
        except Refused as refused:
            return refused.response
        try:
            decision, side, score, scope = _bulk_decision(data)
        except (TypeError, ValueError) as exc:
            return json_response({"error": str(exc)}, 400)
        previous = await run_in_threadpool(self.store.bulk, part, decision, side, score, scope)
        return await run_in_threadpool(self._decided, part, [p["id"] for p in previous], previous)

    def _decided(self, part: Partition, ids: list[str], previous: list[dict]) -> Response:
        """The answer to a decision: new counts, the changed items, and what they were (for undo)."""
        all_items = self.store.items(part)
        wanted = set(ids)
        changed = [{k: i[k] for k in ("id", "status", "human", "decided_by", "decided_at")}
                   for i in all_items if i["id"] in wanted]
        return json_response({"counts": self.store.counts(all_items), "items": changed, "previous": previous})

    # -- image files ----------------------------------------------------------------------------
    def image(self, request: Request) -> Response:
        """An image's own file, served only once it decodes, with its real media type."""
        return self._image_file(request, self._full_image)

    def thumb(self, request: Request) -> Response:
        """An image's cached JPEG thumbnail."""
        return self._image_file(request, self._thumb_image)

    def _full_image(self, image_id: str) -> tuple[Path, str]:
        """The image's own file and its media type, once the safe decoder has read it."""
        path = self.store.image_path(image_id)
        return path, checked_image(path)

    def _thumb_image(self, image_id: str) -> tuple[Path, str]:
        """The image's cached JPEG thumbnail."""
        return self.store.thumbnail(image_id, THUMB_SIDE), "image/jpeg"

    def _image_file(self, request: Request, lookup: Callable[[str], tuple[Path, str]]) -> Response:
        """The file `lookup(image_id)` finds: 404 for an unknown id, 415 for an undecodable file."""
        # The store resolves ids to files: nothing from the request is ever joined into a path.
        try:
            path, media_type = lookup(request.path_params["image_id"])
        except UnknownImage:
            return _not_found("unknown image")
        except ImageRejected as exc:  # the message would name the file: the code is enough here
            return json_response({"error": f"not a decodable image ({exc.code})"}, 415)
        return FileResponse(path, media_type=media_type, headers={**SECURITY_HEADERS, **IMMUTABLE})


async def _not_found_handler(request: Request, exc: Exception) -> Response:
    """Every unrouted URL: the same JSON 404, with the security headers."""
    return _not_found()


def create_app(project: Project, *, host: str = "127.0.0.1", port: int = 8765,
               store: ReviewStore | None = None, allowed_hosts: tuple[str, ...] | list[str] = (),
               token: str | None = None) -> Starlette:
    """The review app for one project, answering Host loopback, `host` and `allowed_hosts` only."""
    # Decision POSTs need `token`: random per app unless a test gives one.
    review = ReviewApp(project, store or ReviewStore(project), token or secrets.token_urlsafe(32))
    # Never "any host", even when bound to 0.0.0.0: a rebinding DNS name must not reach the API.
    allowed = host_names(*LOCAL_HOSTS, host, *allowed_hosts)
    app = Starlette(routes=review.routes(), middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)],
                    exception_handlers={404: _not_found_handler})
    app.state.store = review.store
    app.state.token = review.token
    return app


def serve(project: Project, host: str = "127.0.0.1", port: int = 8765,
          allowed_hosts: tuple[str, ...] | list[str] = ()) -> None:
    """Run the review page until interrupted."""
    import uvicorn

    # Compact first: a table of thousands of one-decision files would make the first request slow
    # (the store compacts again every 500 decisions).
    ReviewStore(project).lineage.compact()
    app = create_app(project, host=host, port=port, allowed_hosts=allowed_hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
