"""The ``openai`` labeller: any OpenAI-compatible chat-completions endpoint.

Works with OpenAI, Anthropic's OpenAI-compatible endpoint, vLLM, llama.cpp's server and the like
(``base_url`` is the part before ``/chat/completions``, e.g. ``https://api.openai.com/v1``).
Requests run concurrently in a bounded thread pool; 429, 5xx, timeouts, dropped connections and
malformed bodies are retried with exponential backoff (honouring ``Retry-After``). Only the
standard library is used.

Failure policy, after retries:
  * cannot connect, timeouts, persistent 429, or 401/403/404/400: the endpoint is unusable ->
    NLAError (labels finished so far are already cached; a re-run resumes);
  * persistent 5xx or a malformed body for one row: that row is dropped (``request_failed`` /
    ``malformed_response``), not cached, and retried by the next run;
  * the request budget ``max_requests`` (every HTTP attempt counts) is spent ->
    `BudgetExhausted` (an NLAError) after the in-flight requests finish and are cached.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from nlakit.errors import NLAError
from nlakit.labels.cache import LabelFailure, LabelRow
from nlakit.labels.core import Labeller
from nlakit.labels.format import label_messages


class BudgetExhausted(NLAError):
    """The request budget (--max-requests) was spent before every row was labelled."""


class EndpointError(NLAError):
    """The endpoint cannot be used at all (unreachable, rejected key, unknown model, ...)."""


class _Aborted(NLAError):
    """Another request already failed fatally: do not send more."""


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class OpenAILabeller(Labeller):
    """Label with an OpenAI-compatible chat-completions endpoint (see module doc)."""

    kind = "openai"
    OPTIONS = ("base_url", "api_model", "api_key_env", "no_api_key", "concurrency",
               "max_requests", "max_retries", "retry_base_delay", "retry_max_delay", "timeout",
               "temperature", "top_p", "max_tokens", "max_new_tokens", "max_prefix_chars")

    def __init__(self, base_url: str, api_model: str, *, api_key_env: str | None =
                 "OPENAI_API_KEY", concurrency: int = 8, max_requests: int | None = None,
                 max_retries: int = 5, retry_base_delay: float = 1.0,
                 retry_max_delay: float = 30.0, timeout: float = 60.0,
                 temperature: float = 0.0, top_p: float | None = None, max_tokens: int = 200,
                 max_prefix_chars: int | None = 2000, one_shot: bool = True):
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise NLAError(f"--base-url must be an http(s) URL such as https://api.openai.com/v1,"
                           f" got {base_url!r}")
        if not api_model:
            raise NLAError("the openai labeller needs --api-model (the model name the endpoint "
                           "serves, e.g. gpt-4o-mini or claude-sonnet-4-5)")
        self.base_url = str(base_url).rstrip("/")
        self.url = (self.base_url if self.base_url.endswith("/chat/completions")
                    else self.base_url + "/chat/completions")
        self.api_model = api_model
        self.api_key_env = api_key_env or None
        self._key = None
        if self.api_key_env:
            self._key = os.environ.get(self.api_key_env)
            if not self._key:
                raise NLAError(f"the environment variable {self.api_key_env} (named by "
                               "--api-key-env) is not set or empty; export your API key there, "
                               "or pass --no-api-key for a local server without authentication")
        self.concurrency = max(1, int(concurrency))
        self.batch_size = self.concurrency * 4
        self.max_requests = None if max_requests is None else int(max_requests)
        self.max_retries = max(0, int(max_retries))
        self.retry_base_delay, self.retry_max_delay = float(retry_base_delay), float(
            retry_max_delay)
        self.timeout = float(timeout)
        self.temperature, self.top_p, self.max_tokens = float(temperature), top_p, int(max_tokens)
        self.max_prefix_chars = max_prefix_chars
        self.one_shot = bool(one_shot)
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self.stats = {"requests": 0, "retries": 0, "row_failures": 0}

    @classmethod
    def from_options(cls, store, options):
        if "base_url" not in options or "api_model" not in options:
            raise NLAError("the openai labeller needs --base-url and --api-model")
        kwargs = {k: v for k, v in options.items()
                  if k not in ("base_url", "api_model", "no_api_key", "max_new_tokens")}
        if "max_new_tokens" in options:  # the CLI's name of the same cap
            kwargs.setdefault("max_tokens", options["max_new_tokens"])
        if options.get("no_api_key"):
            kwargs["api_key_env"] = None
        return cls(options["base_url"], options["api_model"], **kwargs)

    def identity(self) -> dict:
        # the endpoint address is not part of the identity: the same model served elsewhere
        # gives the same labels (it is recorded in provenance)
        return {"kind": self.kind, "api_model": self.api_model,
                "prompt_version": self.prompt_version,
                "settings": {"temperature": self.temperature, "top_p": self.top_p,
                             "max_tokens": self.max_tokens,
                             "max_prefix_chars": self.max_prefix_chars,
                             "one_shot": self.one_shot}}

    def provenance(self) -> dict:
        return {**self.identity(), "base_url": self.base_url, "concurrency": self.concurrency,
                "max_requests": self.max_requests, "max_retries": self.max_retries,
                "timeout_s": self.timeout, "requests": dict(self.stats)}

    # -- one request ----------------------------------------------------------------------

    def _spend(self) -> None:
        with self._lock:
            if self._abort.is_set():
                raise _Aborted("aborted")
            if self.max_requests is not None and self.stats["requests"] >= self.max_requests:
                raise BudgetExhausted(f"request budget of {self.max_requests} spent "
                                      "(--max-requests)")
            self.stats["requests"] += 1

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.retry_base_delay * (2 ** attempt) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.retry_max_delay)

    def _post(self, body: bytes) -> tuple[int, bytes, str | None]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, resp.read(), None
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Retry-After") if e.headers else None

    def request(self, row: LabelRow) -> str:
        """Raw assistant text for one row, with retries (raises _RowError / NLAError)."""
        payload = {"model": self.api_model,
                   "messages": label_messages(row.prefix, self.max_prefix_chars, self.one_shot),
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            payload["top_p"] = self.top_p
        body = json.dumps(payload).encode("utf-8")
        try:
            return self._request(body)
        except (EndpointError, BudgetExhausted):
            self._abort.set()  # stop the other workers from sending more
            raise

    def _request(self, body: bytes) -> str:
        last = ("", "")
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
            self._spend()
            retry_after = None
            try:
                status, data, retry_after = self._post(body)
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException,
                    TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                kind = ("timeout" if isinstance(reason, (socket.timeout, TimeoutError))
                        else "unreachable")
                last = (kind, f"{type(reason).__name__}: {reason}")
            else:
                text = data.decode("utf-8", errors="replace")
                if status == 200:
                    try:
                        content = json.loads(text)["choices"][0]["message"]["content"]
                        if not isinstance(content, str):
                            raise TypeError(f"content is {type(content).__name__}")
                        return content
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        detail = f"{type(e).__name__}: {e}; body: {text[:200]!r}"
                        last = ("malformed_response", detail)
                elif status == 429:
                    last = ("rate_limited", f"HTTP 429: {text[:200]}")
                elif status >= 500 or status == 408:
                    last = ("request_failed", f"HTTP {status}: {text[:200]}")
                else:
                    hint = {401: "the API key was rejected", 403: "the API key was rejected",
                            404: "wrong --base-url or unknown --api-model"}.get(status, "")
                    raise EndpointError(f"{self.url} answered HTTP {status}"
                                        f"{' (' + hint + ')' if hint else ''}: {text[:300]}")
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        kind, detail = last
        if kind in ("unreachable", "timeout", "rate_limited"):
            what = {"unreachable": "cannot reach", "timeout": "timed out talking to",
                    "rate_limited": "still rate-limited by"}[kind]
            raise EndpointError(f"{what} {self.url} after {self.max_retries + 1} attempts "
                                f"({detail}); check --base-url and that the server runs, then "
                                "re-run (finished labels are cached)")
        raise _RowError(kind, detail)

    # -- many rows ------------------------------------------------------------------------

    def iter_labels(self, rows: list[LabelRow]) -> Iterator[tuple[int, str | LabelFailure]]:
        self._abort.clear()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(rows)),
                                  thread_name_prefix="nlakit-label")
        futures = {pool.submit(self.request, row): i for i, row in enumerate(rows)}
        fatal: BaseException | None = None
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.cancelled():
                        continue
                    try:
                        yield futures[fut], fut.result()
                    except _RowError as e:
                        with self._lock:
                            self.stats["row_failures"] += 1
                        yield futures[fut], LabelFailure(e.reason, e.detail)
                    except NLAError as e:  # keep collecting finished rows, then raise
                        if fatal is None and not isinstance(e, _Aborted):
                            fatal = e
                            for f in pending:
                                f.cancel()
        finally:
            pool.shutdown(wait=fatal is not None or not pending, cancel_futures=True)
        self._abort.clear()
        if fatal is not None:
            if isinstance(fatal, BudgetExhausted):
                raise BudgetExhausted(f"{fatal}: stopped after {self.stats['requests']} requests;"
                                      " the labels finished so far are cached, re-run to "
                                      "continue") from None
            raise fatal
