"""The FastAPI application of `nlakit serve`: pages and their JSON endpoints.

Every page is drawn from the same functions the JSON endpoints return (see docs/serve.md);
every piece of model work goes through the one-worker `JobQueue`.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from nlakit import __version__
from nlakit.apps.serve import actions as inspect
from nlakit.apps.serve.jobs import JobQueue
from nlakit.apps.serve.limits import RequestError, ServeLimits
from nlakit.apps.serve.rundata import RunData, find_results
from nlakit.errors import NLAError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` (413) before reading it, and a
    body without a Content-Length (411), so no request can make the server buffer much."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            refuse = None
            if length is not None:
                n = int(length) if length.isdigit() else -1
                if n < 0 or n > self.max_bytes:
                    refuse = (413, {"error": f"the request body is {length.decode()} bytes; the "
                                             f"limit max_body_bytes is {self.max_bytes}",
                                    "limit": "max_body_bytes", "value": n,
                                    "max": self.max_bytes})
            elif b"chunked" in headers.get(b"transfer-encoding", b""):
                refuse = (411, {"error": "send the request body with a Content-Length"})
            if refuse is not None:
                await JSONResponse(refuse[1], status_code=refuse[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- request bodies (unknown fields are refused) -------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class TextInput(Strict):
    text: str | None = Field(None, description="plain text; or give messages")
    messages: list[Message] | None = Field(None, description="a chat, rendered with the "
                                                             "target's chat template")


class TokenizeRequest(TextInput):
    top_k: int = Field(5, ge=1, description="top next tokens per position")


class ExplainRequest(TextInput):
    positions: Literal["all", "last"] | list[int] = "all"
    best_of: int = Field(1, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    seed: int = 0
    wait: bool = Field(False, description="answer when the job is done instead of at once")


class ReconstructRequest(Strict):
    explanation: str
    row_id: int | None = Field(None, description="compare with this row's true activation")
    text: str | None = Field(None, description="or with the activation at `position` of text")
    position: int | None = None


class EditsRequest(Strict):
    explanation: str | None = Field(None, description="default: the row's eval explanation")
    seed: int = 0


# ---- the application -----------------------------------------------------------------------


class Viewer:
    """What the routes share: the NLA, the run's data, the limits and the job queue."""

    def __init__(self, nla, run: RunData, limits: ServeLimits, chunk: int):
        self.nla, self.run, self.limits, self.chunk = nla, run, limits, int(chunk)
        self.queue = JobQueue(limits.max_queue)
        self.model, self.tokenizer = nla.target()
        # the request handlers' own copy: a fast tokenizer must not be used from two threads
        # at once while the worker's library calls may set its padding/truncation
        self.request_tokenizer = copy.deepcopy(self.tokenizer)
        self.rawvar, self.rawvar_source = self._rawvar()

    def _rawvar(self) -> tuple[float | None, str]:
        r = self.nla.dataset_stats.get("rawvar")
        if r is not None:
            return float(r), "the NLA's training store (nla_meta.yaml dataset_stats)"
        if self.run.store is not None:
            return float(self.run.store.stats("all")["rawvar"]), \
                f"the activation store {self.run.store.path} (all splits)"
        if self.run.rawvar is not None:
            return self.run.rawvar, "the eval results"
        return None, "unknown: fve_nrm is not shown, colours use cos"

    def info(self) -> dict:
        return {"nlakit": __version__, "layer": self.nla.layer, "d_model": self.nla.d_model,
                "target": self.nla.target_info.get("spec"),
                "trained": bool(self.nla.av_meta.get("nlakit", {}).get("provenance")),
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
                "rawvar": self.rawvar, "rawvar_source": self.rawvar_source,
                "has_eval": self.run.eval is not None, "has_audit": self.run.audit is not None,
                "has_acts": self.run.store is not None, "limits": self.limits.as_dict(),
                "chunk": self.chunk}

    # ---- input checks ----------------------------------------------------------------------

    def text_of(self, req: TextInput) -> str:
        lim = self.limits
        if (req.text is None) == (req.messages is None):
            raise RequestError("send exactly one of `text` or `messages`")
        if req.messages is not None:
            lim.check("max_messages", len(req.messages), "the chat's number of turns")
            if not req.messages:
                raise RequestError("empty chat: send at least one message")
            lim.check("max_text_chars", sum(len(m.content) for m in req.messages),
                      "the chat's length in characters")
            try:
                text = inspect.render_chat(self.request_tokenizer,
                                           [m.model_dump() for m in req.messages])
            except NLAError as e:
                raise RequestError(str(e)) from None
        else:
            text = req.text
            lim.check("max_text_chars", len(text), "the text's length in characters")
        if not text.strip():
            raise RequestError("empty text: nothing to explain")
        return text

    def ids_of(self, text: str) -> list[int]:
        ids = inspect.token_ids(self.request_tokenizer, text)
        self.limits.check("max_tokens", len(ids), "the text's length in tokens")
        return ids

    def positions_of(self, positions, n_tokens: int) -> list[int]:
        if positions == "all":
            chosen = list(range(n_tokens))
        elif positions == "last":
            chosen = [n_tokens - 1]
        else:
            if not positions:
                raise RequestError("positions is an empty list")
            chosen = [p + n_tokens if p < 0 else p for p in positions]
            bad = [p for p in positions if not -n_tokens <= p < n_tokens]
            if bad:
                raise RequestError(f"positions {bad[:5]} are out of range for a text of "
                                   f"{n_tokens} tokens", status=422)
            chosen = list(dict.fromkeys(chosen))
        self.limits.check("max_positions", len(chosen), "the number of positions to explain")
        return chosen

    def new_tokens(self, n: int | None) -> int:
        if n is None:
            return self.limits.default_new_tokens
        self.limits.check("max_new_tokens", n, "max_new_tokens")
        return n

    async def wait(self, job) -> object:
        return await asyncio.wrap_future(job.future)


def create_app(nla, *, acts=None, eval_dir=None, audit=None, limits: ServeLimits | None = None,
               chunk: int = 16, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The viewer's ASGI app for a loaded `NLA` (or an NLA directory, loaded once here).

    acts: an activation store directory (true activations of rows: Reconstruct, per-row edits,
    document kinds); eval_dir: an eval directory, eval.json, or pipeline run directory (its
    audit.json is found next to it); audit: an explicit audit directory or audit.json.
    chunk: positions per batched generation of an explain job (the progress granularity).
    allowed_hosts: Host headers accepted (default: loopback names only, against DNS
    rebinding)."""
    if isinstance(nla, (str, Path)):
        from nlakit.nla.facade import NLA

        nla = NLA.load(nla)
    eval_path = audit_path = None
    if eval_dir is not None:
        eval_path, audit_path = find_results(eval_dir)
    if audit is not None:
        _, audit_path = find_results(audit)
    run = RunData(nla, eval_path=eval_path, audit_path=audit_path, acts=acts)
    v = Viewer(nla, run, limits or ServeLimits(), chunk)

    # the OpenAPI schema at /api/openapi.json; no Swagger page (it would load scripts from a
    # CDN, which the CSP forbids and an offline machine cannot reach)
    app = FastAPI(title="nlakit serve", version=__version__,
                  description="A local viewer of a natural language autoencoder; see "
                              "docs/serve.md.", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.viewer = v
    _add_security(app, v, allowed_hosts)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html

    def page(request: Request, name: str, status: int = 200, **ctx):
        return templates.TemplateResponse(request, name, {"info": v.info(), **ctx},
                                          status_code=status)

    _add_error_handlers(app, page)
    for routes in (_queue_routes(v), _text_routes(v), _reconstruct_routes(v), _run_routes(v),
                   _page_routes(v, page)):
        app.include_router(routes)
    app.state.close = v.queue.close
    return app


def _add_security(app: FastAPI, v: Viewer, allowed_hosts: list[str] | None) -> None:
    """Bounded bodies, loopback Host headers only (against DNS rebinding), strict headers."""
    app.add_middleware(BodyLimit, max_bytes=v.limits.max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_NAMES)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response


def _add_error_handlers(app: FastAPI, page) -> None:
    """Errors: JSON under /api, an escaped HTML page elsewhere."""

    def error_response(request: Request, status: int, payload: dict):
        if request.url.path.startswith("/api"):
            return JSONResponse(payload, status_code=status)
        return page(request, "error.html", status=status, status_code=status, error=payload)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(request, exc.status, exc.payload())

    @app.exception_handler(NLAError)
    async def _nla_error(request: Request, exc: NLAError):
        return error_response(request, 422, {"error": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(request, 400, {"error": "the request body is not valid JSON",
                                                 "detail": _clean(errs)})
        where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}"
                          for e in errs)
        return error_response(request, 422, {"error": f"invalid request: {where}",
                                             "detail": _clean(errs)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, {"error": str(exc.detail)})


def _queue_routes(v: Viewer) -> APIRouter:
    router = APIRouter()

    @router.get("/api/info")
    async def api_info():
        """The NLA (layer, d_model, target), what is loaded, and the request limits."""
        return v.info()

    @router.get("/api/queue")
    async def api_queue():
        """The job queue: the running job, the waiting ones, and the most seen at once."""
        return v.queue.state()

    @router.get("/api/jobs/{job_id}")
    async def api_job(job_id: str, since: Annotated[int, Query(ge=0)] = 0):
        """A job's status, place in the queue, progress and (partial) results."""
        job = v.queue.get(job_id)
        if job is None:
            raise RequestError(f"unknown job id {job_id!r} (finished jobs are kept for a while "
                               "only)", status=404)
        return v.queue.describe(job, since=since)

    return router


def _text_routes(v: Viewer) -> APIRouter:
    """Model work on a text: its tokens, and explanations of its positions."""
    router = APIRouter()

    @router.post("/api/tokenize")
    async def api_tokenize(req: Annotated[TokenizeRequest, Body()]):
        """Tokens of a text (or rendered chat) and the target's top next tokens at each."""
        text = v.text_of(req)
        ids = v.ids_of(text)
        v.limits.check("max_top_k", req.top_k, "top_k")

        def work(job):
            top = inspect.top_next_tokens(v.model, v.tokenizer, ids, req.top_k)
            toks = inspect.token_texts(v.tokenizer, ids)
            return {"text": text, "n_tokens": len(ids),
                    "tokens": [{"position": i, "id": t, "token": s, "top_next": top[i]}
                               for i, (t, s) in enumerate(zip(ids, toks))]}

        job = v.queue.submit("tokenize", work)
        result = await v.wait(job)
        return {**result, "job_id": job.id, "queue_position_at_submit":
                job.queue_position_at_submit}

    @router.post("/api/explain")
    async def api_explain(req: Annotated[ExplainRequest, Body()]):
        """Queue an explain job (202 with its id and place in the queue), or with
        "wait": true answer with the finished job."""
        text = v.text_of(req)
        ids = v.ids_of(text)
        positions = v.positions_of(req.positions, len(ids))
        v.limits.check("max_best_of", req.best_of, "best_of (N of best-of-N)")
        new_tokens = v.new_tokens(req.max_new_tokens)

        def work(job):
            got, acts = v.nla.activations(text)
            if list(got) != ids:
                raise NLAError("the target tokenized the text differently on a second reading")
            results = inspect.explain_positions(
                v.nla, ids, acts, positions, best_of=req.best_of, max_new_tokens=new_tokens,
                seed=req.seed, rawvar=v.rawvar, chunk=v.chunk,
                on_chunk=lambda done, new: job.progress(done, new))
            return {"text": text, "n_tokens": len(ids), "positions": positions,
                    "best_of": req.best_of, "max_new_tokens": new_tokens, "rawvar": v.rawvar,
                    "results": results}

        job = v.queue.submit("explain", work, total=len(positions))
        if req.wait:
            await v.wait(job)
            return v.queue.describe(job)
        return JSONResponse(v.queue.describe(job), status_code=202)

    return router


def _reconstruct_routes(v: Viewer) -> APIRouter:
    """The AR's reading of an explanation, and of the audit's edits of a row's one."""
    router = APIRouter()

    @router.post("/api/reconstruct")
    async def api_reconstruct(req: Annotated[ReconstructRequest, Body()]):
        """The AR's reading of an explanation against a row's (or a text token's) true
        activation: cos, mse_nrm, fve_nrm."""
        v.limits.check("max_explanation_chars", len(req.explanation),
                       "the explanation's length in characters")
        if not req.explanation.strip():
            raise RequestError("empty explanation: type some text to reconstruct")
        if (req.row_id is None) == (req.text is None):
            raise RequestError("send exactly one of `row_id` or `text` (with `position`)")
        rawvar = v.rawvar
        if req.row_id is not None:
            vec = v.run.vector(req.row_id)
            rawvar = v.run.rawvar if v.run.rawvar is not None else rawvar
            target = {"row_id": req.row_id}
        else:
            text = v.text_of(TextInput(text=req.text))
            ids = v.ids_of(text)
            if req.position is None:
                raise RequestError("`text` needs a `position` (a token index)")
            pos = v.positions_of([req.position], len(ids))[0]
            vec = None
            target = {"text": text, "position": pos,
                      "token": v.request_tokenizer.decode([ids[pos]])}

        def work(job):
            vv = vec if vec is not None else v.nla.activations(target["text"])[1][
                target["position"]]
            s = inspect.score_texts(v.nla, [req.explanation], vv.reshape(1, -1), rawvar)[0]
            return {**s, "rawvar": rawvar, "target": target, "explanation": req.explanation}

        job = v.queue.submit("reconstruct", work)
        return {**(await v.wait(job)), "job_id": job.id,
                "queue_position_at_submit": job.queue_position_at_submit}

    @router.post("/api/rows/{row_id}/edits")
    async def api_row_edits(row_id: int, req: Annotated[EditsRequest | None, Body()] = None):
        """The audit's edits of this row's explanation, scored now against its activation."""
        req = req or EditsRequest()
        row = v.run.row(row_id)
        text = req.explanation if req.explanation is not None else row.get("explanation")
        if not text or not text.strip():
            raise RequestError(f"row {row_id} has no explanation; send one as `explanation`")
        v.limits.check("max_explanation_chars", len(text), "the explanation's length")
        vec = v.run.vector(row_id)
        rawvar = v.run.rawvar if v.run.rawvar is not None else v.rawvar
        job = v.queue.submit("edits", lambda job: inspect.row_edits(v.nla, text, vec, rawvar,
                                                                    seed=req.seed))
        return {"row_id": row_id, **(await v.wait(job)), "rawvar": rawvar}

    return router


def _run_routes(v: Viewer) -> APIRouter:
    """The loaded eval and audit results."""
    router = APIRouter()

    @router.get("/api/run")
    async def api_run():
        """Summary of the loaded eval (each method's mean fve_nrm) and audit (each edit's
        drop and verdict)."""
        return v.run.summary()

    @router.get("/api/rows")
    async def api_rows(sort: str = "row_id", order: str = "asc",
                       min_score: float | None = None, max_score: float | None = None,
                       doc: str | None = None, kind: str | None = None, q: str | None = None,
                       offset: Annotated[int, Query(ge=0)] = 0,
                       limit: Annotated[int, Query(ge=1)] = 100):
        """Eval rows, filtered, sorted and paged; each with its explanation, its score
        (the NLA's fve_nrm) and every baseline's fve_nrm for that row."""
        v.limits.check("max_rows_per_page", limit, "limit (rows per page)")
        return v.run.query(sort=sort, order=order, min_score=min_score, max_score=max_score,
                           doc=doc, kind=kind, q=q, offset=offset, limit=limit)

    @router.get("/api/rows/{row_id}")
    async def api_row(row_id: int):
        """One row: its context, explanation, scores, and the audit's edits of it."""
        return v.run.row(row_id)

    @router.get("/api/audit/examples")
    async def api_audit_examples():
        """The audit's per-row examples: original vs edited explanation, with the drop."""
        if v.run.audit is None:
            raise RequestError("no audit results loaded: start the server with --eval DIR of a "
                               "run that has audit/audit.json", status=409)
        return {"examples": v.run.audit_examples()}

    return router


def _page_routes(v: Viewer, page) -> APIRouter:
    router = APIRouter()

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @router.get("/", response_class=HTMLResponse)
    async def explain_page(request: Request):
        return page(request, "explain.html", active="explain")

    @router.get("/browse", response_class=HTMLResponse)
    async def browse_page(request: Request, sort: str = "row_id", order: str = "asc",
                          min_score: float | None = None, max_score: float | None = None,
                          doc: str | None = None, kind: str | None = None,
                          q: str | None = None, offset: Annotated[int, Query(ge=0)] = 0,
                          limit: Annotated[int, Query(ge=1)] = 100):
        data = None
        if v.run.eval is not None:
            v.limits.check("max_rows_per_page", limit, "limit (rows per page)")
            data = v.run.query(sort=sort, order=order, min_score=min_score,
                               max_score=max_score, doc=doc or None, kind=kind or None,
                               q=q or None, offset=offset, limit=limit)
        params = {"sort": sort, "order": order, "min_score": min_score, "max_score": max_score,
                  "doc": doc or "", "kind": kind or "", "q": q or "", "limit": limit}
        return page(request, "browse.html", active="browse", data=data, params=params,
                    summary=v.run.summary(), examples=v.run.audit_examples())

    @router.get("/browse/rows/{row_id}", response_class=HTMLResponse)
    async def row_page(request: Request, row_id: int):
        return page(request, "row.html", active="browse", row=v.run.row(row_id))

    @router.get("/reconstruct", response_class=HTMLResponse)
    async def reconstruct_page(request: Request, row_id: int | None = None,
                               explanation: str = "", text: str = "",
                               position: int | None = None):
        row = v.run.row(row_id) if row_id is not None else None
        if row is not None and not explanation:
            explanation = row.get("explanation") or ""
        return page(request, "reconstruct.html", active="reconstruct", row=row,
                    explanation=explanation, text=text, position=position,
                    row_ids=[r["row_id"] for r in v.run.rows[:2000]])

    return router

def _clean(errors: list[dict]) -> list[dict]:
    """Validation errors without the raw input (which may be large) or exception objects."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")}
            for e in errors]
