"""Request limits of the viewer: every request that exceeds one gets a 4xx naming the limit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from nlakit.config import option
from nlakit.errors import NLAError


class RequestError(NLAError):
    """A request the server refuses: `status` is the HTTP status, `limit` the name of the
    limit it exceeds (None for other bad input such as empty text or an unknown row id)."""

    def __init__(self, message: str, status: int = 422, limit: str | None = None,
                 value=None, maximum=None):
        super().__init__(message)
        self.status, self.limit, self.value, self.maximum = status, limit, value, maximum

    def payload(self) -> dict:
        out = {"error": str(self)}
        if self.limit is not None:
            out.update(limit=self.limit, value=self.value, max=self.maximum)
        return out


@dataclass(frozen=True)
class ServeLimits:
    """Upper bounds on what one request may ask of the server (all inclusive). Each is also a
    flag of `nlakit serve` (``--max-text-chars`` ...)."""

    max_text_chars: int = option(4000, "characters of a text to explain (a chat: all turns)")
    max_tokens: int = option(256, "tokens of that text under the target's tokenizer")
    max_positions: int = option(64, "token positions one request explains (all = every token)")
    max_best_of: int = option(8, "N of best-of-N")
    max_new_tokens: int = option(150, "explanation length cap a request may ask for")
    default_new_tokens: int = option(96, "explanation length cap when a request names none")
    max_explanation_chars: int = option(2000, "characters of an explanation sent to "
                                              "Reconstruct or the edits")
    max_messages: int = option(32, "turns of a chat")
    max_top_k: int = option(20, "top next tokens shown per position")
    max_queue: int = option(32, "jobs waiting in the queue; one more gets 429")
    max_rows_per_page: int = option(500, "rows returned by one /api/rows call")
    max_body_bytes: int = option(1_000_000, "bytes of a request body (checked before reading)")

    def __post_init__(self):
        for f in fields(self):
            if int(getattr(self, f.name)) < 1:
                raise NLAError(f"serve limit {f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.default_new_tokens > self.max_new_tokens:
            raise NLAError(f"default_new_tokens {self.default_new_tokens} exceeds "
                           f"max_new_tokens {self.max_new_tokens}")

    def check(self, name: str, value: int, what: str) -> None:
        """Raise a 413 RequestError naming limit `name` when value > the limit."""
        maximum = int(getattr(self, name))
        if value > maximum:
            raise RequestError(f"{what} is {value}; the limit {name} is {maximum}", status=413,
                               limit=name, value=value, maximum=maximum)

    def as_dict(self) -> dict:
        return asdict(self)
