"""The operator's console at /ui: server-rendered pages over the console library, for admin keys only.

A browser cannot send a bearer header, so /ui/login takes an admin key in a form and answers with a
session cookie (HttpOnly, SameSite=Strict, Path=/ui): an HMAC-signed token holding a random session id,
the admin's name, an expiry and a keyed tag of the key's hash (never the key nor its hash). Every request
checks the signature and that the tag still belongs to a live admin key, so revoking the key ends its
sessions. A request with `Authorization: Bearer <admin key>` is also let in (and gets a cookie). Every
POST carries the session's CSRF token (an HMAC of the session id) and must come from this origin. The
signing secret is `IAPO_UI_SECRET` when set (required for several workers or replicas behind one
address), else random per process. Caller keys get 403 and no session; anonymous browsers are sent to the
login page and other clients get a 401."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from gateway import console, ui_charts
from gateway.errors import GatewayError
from gateway.openai_wire import error_body
from store.keys import KeyStore, hash_key
from store.policy_store import PolicyStore
from store.spend import SpendLedger
from store.training_runs import TrainingRuns

log = logging.getLogger("iapo.ui")
TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "iapo_ui_session"
SESSION_SECONDS = 8 * 3600
HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "same-origin",
}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Session:
    sid: str
    name: str  # the admin key's name, which signs every action
    tag: str
    expires: float
    csrf: str
    cookie: str | None = None  # a cookie to set on the response (a new session)


class Sessions:
    """Signed session tokens; nothing about a session is stored but the ids of those logged out here."""

    def __init__(self, secret: str | None = None) -> None:
        secret = secret if secret is not None else os.environ.get("IAPO_UI_SECRET")
        self.secret = hashlib.sha256(secret.encode()).digest() if secret else secrets.token_bytes(32)
        self.ended: dict[str, float] = {}

    def _mac(self, what: str) -> str:
        return _b64(hmac.new(self.secret, what.encode(), hashlib.sha256).digest())

    def tag(self, key_hash: str) -> str:
        return self._mac("key:" + key_hash)[:32]

    def issue(self, name: str, key_hash: str, now: float | None = None) -> Session:
        sid, expires = secrets.token_urlsafe(18), (now or time.time()) + SESSION_SECONDS
        payload = _b64(json.dumps({"sid": sid, "name": name, "tag": self.tag(key_hash), "exp": int(expires)}).encode())
        return Session(sid, name, self.tag(key_hash), expires, self._mac("csrf:" + sid),
                       f"{payload}.{self._mac('session:' + payload)}")

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        payload, _, mac = (cookie or "").partition(".")
        if not payload or not hmac.compare_digest(mac, self._mac("session:" + payload)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            sid, name, tag, exp = data["sid"], data["name"], data["tag"], float(data["exp"])
        except (ValueError, KeyError, TypeError):
            return None
        if exp <= (now or time.time()) or sid in self.ended:
            return None
        return Session(sid, name, tag, exp, self._mac("csrf:" + sid))

    def end(self, session: Session) -> None:
        now = time.time()
        self.ended = {s: e for s, e in self.ended.items() if e > now}
        self.ended[session.sid] = session.expires


def _bearer(authorization: str | None) -> str | None:
    scheme, _, value = (authorization or "").partition(" ")
    return (value.strip() if scheme.lower() == "bearer" else (authorization or "").strip()) or None


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(ui_charts.FILTERS)
    return Jinja2Templates(env=env)


def ui_routes(service) -> list[Route]:
    templates = _templates()
    sessions = Sessions()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not os.environ.get("IAPO_UI_SECRET"):
        log.warning("several workers and no IAPO_UI_SECRET: a /ui login holds only on the worker that took it; "
                    "set IAPO_UI_SECRET (the same on every worker and replica)")
    keys = lambda: KeyStore(service.db)  # noqa: E731
    policies = lambda: PolicyStore(service.db)  # noqa: E731

    def live_admin(tag: str) -> str | None:
        """The current name of the admin key behind a session's tag; None once it is revoked or gone."""
        for configured in service.settings.admin_keys:
            if hmac.compare_digest(sessions.tag(configured.hash), tag):
                return configured.name
        for record in keys().list(role="admin"):
            if record.revoked is None and hmac.compare_digest(sessions.tag(record.hash), tag):
                return record.name
        return None

    def authenticate(request: Request) -> Session | None:
        """The session of this request: a bearer admin key (a new session), else a valid cookie; None
        when anonymous. A caller key or a bad key raises (403 / 401)."""
        authorization = request.headers.get("authorization")
        if authorization:
            admin = service.access.admin(authorization, service.rt)
            return sessions.issue(admin.name, hash_key(_bearer(authorization)))
        session = sessions.read(request.cookies.get(COOKIE))
        if session is None:
            return None
        name = live_admin(session.tag)
        return Session(session.sid, name, session.tag, session.expires, session.csrf) if name else None

    def render(request: Request, name: str, context: dict, status: int = 200, session: Session | None = None):
        context = {"admin": session.name if session else None, "csrf": session.csrf if session else "",
                   "serving": service.policy.version, "path": request.url.path, **context}
        response = templates.TemplateResponse(request, name, context, status_code=status)
        return finish(request, response, session)

    def finish(request: Request, response: Response, session: Session | None = None) -> Response:
        response.headers.update(HEADERS)
        if session is not None and session.cookie:
            secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
            response.set_cookie(COOKIE, session.cookie, max_age=SESSION_SECONDS, path="/ui", httponly=True,
                                samesite="strict", secure=secure)
        return response

    def refuse(request: Request, err: GatewayError, session: Session | None = None) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return render(request, "error.html", {"title": f"{err.status}", "status": err.status,
                                                  "message": err.message}, err.status, session)
        return finish(request, JSONResponse(error_body(err), status_code=err.status))

    def same_origin(request: Request) -> bool:
        """A browser's POST from a page of this console (behind a proxy: its X-Forwarded-Host)."""
        if request.headers.get("sec-fetch-site") == "cross-site":
            return False
        origin = request.headers.get("origin")
        hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")} - {None}
        return origin is None or urlsplit(origin).netloc in hosts

    def page(fn, *, post: bool = False):
        async def endpoint(request: Request) -> Response:
            try:
                session = authenticate(request)
            except GatewayError as err:
                return refuse(request, err)
            if session is None:
                if "text/html" in request.headers.get("accept", "") and not post:
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return finish(request, RedirectResponse(f"/ui/login?next={quote(target)}", 303))
                return refuse(request, GatewayError(401, "The console needs an admin key: log in at /ui/login.",
                                                    type="authentication_error", code="missing_api_key"))
            form = {}
            if post:
                form = await _form(request)
                if not same_origin(request) or not hmac.compare_digest(form.get("csrf_token", ""), session.csrf):
                    return refuse(request, GatewayError(
                        403, "This form has expired or did not come from the console (missing or wrong CSRF token); "
                             "reload the page and retry.", type="permission_error", code="csrf_failed"), session)
            try:
                result = fn(request, session, form)
            except console.ConsoleError as exc:
                return refuse(request, GatewayError(exc.status, str(exc), code=exc.code), session)
            if isinstance(result, Response):
                return finish(request, result, session)
            name, context, *status = result
            return render(request, name, context, status[0] if status else 200, session)
        return endpoint

    def act(session: Session, request: Request, action: str, target: str, detail: dict) -> None:
        console.record_action(service.db, session.name, action, target, detail | {"path": request.url.path,
                                                                                   "via": "ui"})
        log.info("admin %s (ui): %s %s", session.name, action, target)

    # -- login ----------------------------------------------------------------------------------
    async def login(request: Request) -> Response:
        target = _next(request.query_params.get("next"))
        if request.method == "GET":
            return render(request, "login.html", {"title": "Log in", "next": target})
        form = await _form(request)
        target = _next(form.get("next"))
        key = form.get("key", "").strip()
        if not same_origin(request):
            return render(request, "login.html", {"title": "Log in", "next": target,
                                                  "error": "This form did not come from the console."}, 403)
        try:
            admin = service.access.admin(f"Bearer {key}" if key else None, service.rt)
        except GatewayError as err:
            message = "That is a caller's key: the console needs an admin key." if err.status == 403 else \
                "That is not an admin key (unknown or revoked)." if key else "Paste an admin key."
            return render(request, "login.html", {"title": "Log in", "next": target, "error": message}, err.status)
        session = sessions.issue(admin.name, hash_key(key))
        act(session, request, "ui.login", admin.name, {})
        return finish(request, RedirectResponse(target, 303), session)

    def logout(request, session, form):
        sessions.end(session)
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # -- pages ----------------------------------------------------------------------------------
    def overview(request, session, form):
        return "overview.html", {"title": "Policy", **_overview(service, policies())}

    def policy_versions(request, session, form):
        store = policies()
        latest = store.latest_version()
        versions = list(reversed(console.policy_versions(store)))[:50]
        empty = {v["version"] for v in versions if not _has_arms(store, v["version"])}
        for v in versions:
            if v["version"] == latest:
                v["changes"] = []
            elif v["version"] in empty or latest in empty:  # a copy of v0 (console.policy_diff refuses it)
                v["changes"] = None if {v["version"], latest} <= empty else "all"
            else:
                v["changes"] = console.policy_diff(store, v["version"], latest)
            v["start_arms"] = v["version"] in empty
        done = request.query_params.get("rolled_back")
        return "policies.html", {"title": "Policy versions", "versions": versions, "latest": latest,
                                 "flash": f"Rolled back: version {_int(done)}, a copy of version "
                                          f"{_int(request.query_params.get('copy_of'))}, is published; the gateway "
                                          "switches to it within its policy poll interval." if done else None}

    def rollback(request, session, form):
        to = _int(form.get("version"))
        if to is None:
            raise console.ConsoleError("version must be an integer")
        new = console.rollback(policies(), to)
        act(session, request, "policy.rollback", f"policy version {to}", {"version": to, "new_version": new})
        return RedirectResponse(f"/ui/policies?rolled_back={new}&copy_of={to}", 303)

    def training(request, session, form):
        route = request.query_params.get("route") or None
        runs = console.training_runs(TrainingRuns(service.db), route, limit=20)
        for run in runs:
            trajectory = run["trajectory"] if isinstance(run["trajectory"], dict) else {}
            run["chart"] = ui_charts.trajectory(trajectory, run["budget"],
                                                title=f"estimate trajectory of {run['run_id']}")
        return "training.html", {"title": "Training", "runs": runs, "route": route,
                                 "routes": [r.model for r in service.settings.routes]}

    def spend(request, session, form):
        rows = console.spend_report(SpendLedger(service.db), service.settings, keys())
        return "spend.html", {"title": "Spend", "capped": [r for r in rows if r["used_ratio"] is not None],
                              "uncapped": [r for r in rows if r["used_ratio"] is None]}

    def requests(request, session, form):
        q = request.query_params
        filters = {"route": q.get("route") or None, "tier": q.get("tier") or None, "status": _int(q.get("status")),
                   "kind": q.get("kind") or None}
        rows = console.recent_requests(service.db, **filters, limit=_int(q.get("limit")) or 100)
        return "requests.html", {"title": "Requests", "rows": rows, "filters": filters,
                                 "routes": [r.model for r in service.settings.routes],
                                 "tiers": [t.name for t in service.settings.tiers]}

    def request_detail(request, session, form):
        detail = console.request_detail(service.db, request.path_params["request_id"])
        return "request.html", {"title": f"Request {detail['request']['id']}", **detail}

    def key_list(request, session, form):
        listed = [k.public() for k in keys().list()]
        revoked = request.query_params.get("revoked")
        return "keys.html", {"title": "Keys", "keys": listed,
                             "configured": [{"name": k.name or "(unnamed)", "tier": k.tier, "role": "caller"}
                                            for k in service.settings.api_keys]
                             + [{"name": k.name, "tier": None, "role": "admin"} for k in service.settings.admin_keys],
                             "tiers": [t.name for t in service.settings.tiers],
                             "flash": f"Revoked key {revoked}." if any(
                                 revoked in (k["id"], k["name"]) and k["revoked"] for k in listed) else None}

    def create_key(request, session, form):
        admin = form.get("role") == "admin"
        models = [m.strip() for m in form.get("models", "").split(",") if m.strip()] or None
        secret, record = console.create_key(keys(), service.settings, tier=None if admin else form.get("tier"),
                                            name=form.get("name") or None, admin=admin, models=models)
        act(session, request, "key.create", record.name, {"tier": record.tier, "admin": admin, "models": models})
        return "key_created.html", {"title": "Key created", "key": record.public(), "secret": secret}

    def revoke(request, session, form):
        target = request.path_params["key"]
        console.revoke_key(keys(), target)
        service.access.clear()
        act(session, request, "key.revoke", target, {})
        return RedirectResponse(f"/ui/keys?revoked={quote(target)}", 303)

    def audit(request, session, form):
        return "audit.html", {"title": "Audit log", "actions": console.admin_actions(service.db, 200)}

    return [
        Route("/ui/login", login, methods=["GET", "POST"]),
        Route("/ui/logout", page(logout, post=True), methods=["POST"]),
        Route("/ui", page(overview), methods=["GET"]),
        Route("/ui/", page(overview), methods=["GET"]),
        Route("/ui/policies", page(policy_versions), methods=["GET"]),
        Route("/ui/policies/rollback", page(rollback, post=True), methods=["POST"]),
        Route("/ui/training", page(training), methods=["GET"]),
        Route("/ui/spend", page(spend), methods=["GET"]),
        Route("/ui/requests", page(requests), methods=["GET"]),
        Route("/ui/requests/{request_id}", page(request_detail), methods=["GET"]),
        Route("/ui/keys", page(key_list), methods=["GET"]),
        Route("/ui/keys", page(create_key, post=True), methods=["POST"]),
        Route("/ui/keys/{key}/revoke", page(revoke, post=True), methods=["POST"]),
        Route("/ui/audit", page(audit), methods=["GET"]),
    ]


def _overview(service, store: PolicyStore) -> dict:
    """Per route and tier: the arm in the newest version (or the configured start arm), its value ± s.e.
    and cost, the ranked alternatives, and the value-versus-N chart of the top prompts."""
    settings = service.settings
    latest = store.latest_version()
    try:
        entries = console.policy_view(store)["entries"]
    except console.ConsoleError:  # the newest version has no rows: a rollback to the start arms
        entries = []
    found = {(e["route"], e["tier"]): e for e in entries}
    routes = []
    for route in settings.routes:
        runs = [r for r in console.training_runs(TrainingRuns(service.db), route.model, limit=20)
                if isinstance(r.get("curves"), dict)]
        tiers = []
        for tier in settings.tiers:
            entry = found.get((route.model, tier.name))
            if entry is not None:
                arm, ranked = (entry["prompt_id"], entry["n"]), entry["ranked"]
                value, se = entry["value"], entry["value_se"]
            else:
                start = service.rt.start_arm(route, tier.name)
                arm, value, se, ranked = (start.prompt_id, start.n), None, None, []
            cost = next((a["cost"] for a in ranked if (a["prompt_id"], a["n"]) == arm), None)
            curves, source = _curves_for(runs, tier.name, arm, ranked)
            title = f"{route.model} / {tier.name}: estimated value versus N"
            tiers.append({"tier": tier, "entry": entry, "arm": arm, "value": value, "se": se, "cost": cost,
                          "ranked": ranked, "source": source,
                          "chart": ui_charts.value_vs_n(curves, arm, value, se, title=title)})
        routes.append({"route": route, "tiers": tiers})
    return {"routes": routes, "latest": latest, "trained": bool(entries)}


def _has_arms(store: PolicyStore, version: int) -> bool:
    try:
        return bool(console.policy_view(store, version)["entries"])
    except console.ConsoleError:
        return False


def _curves_for(runs: list[dict], tier: str, arm: tuple[str, int], ranked: list[dict]) -> tuple[dict, str]:
    """The value-versus-N curves of a tier: from the training run that chose the served arm (else the
    newest run with curves), else the points of the ranked alternatives."""
    usable = [r for r in runs if _valid_curves(r["curves"].get(tier))]
    chose = [r for r in usable for c in r.get("changes") or []
             if c.get("tier") == tier and list(c.get("new") or []) == list(arm)]
    run = (chose or usable or [None])[0]
    top = max((a["n"] for a in ranked), default=0)
    if run is not None:
        curves, source = dict(run["curves"][tier]), f"training run {run['run_id']} (its top prompts)"
        if arm[0] not in curves and any(a["prompt_id"] == arm[0] for a in ranked):  # the served prompt, always
            curves[arm[0]] = [next((a["value"] for a in ranked if (a["prompt_id"], a["n"]) == (arm[0], n)), None)
                              for n in range(1, top + 1)]
            source += " and the served prompt's ranked estimates"
        return curves, source
    curves = {}
    for a in ranked:
        curves.setdefault(a["prompt_id"], [None] * top)[a["n"] - 1] = a["value"]
    return curves, "the ranked alternatives (the best prompt at each N)" if ranked else "no estimates"


def _valid_curves(curves) -> bool:
    return isinstance(curves, dict) and bool(curves) and all(
        isinstance(v, list) and all(x is None or isinstance(x, (int, float)) for x in v) for v in curves.values())


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (the console's forms post nothing else): first value of each field."""
    raw = await request.body()
    try:
        return {k: v[0] for k, v in parse_qs(raw.decode("utf-8"), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        return {}


def _next(target: str | None) -> str:
    """Where to go after logging in: a console path only (no open redirect)."""
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
