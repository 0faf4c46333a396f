"""Request limits of the viewer: every request that exceeds one gets a 4xx naming the limit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import NLAError


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
    """Upper bounds on what one request may ask of the server (all inclusive)."""

    max_text_chars: int = 4000  # characters of a text to explain (chat: all turns together)
    max_tokens: int = 256  # tokens of that text under the target's tokenizer
    max_positions: int = 64  # token positions explained by one request ("all" counts them all)
    max_best_of: int = 8  # N of best-of-N
    max_new_tokens: int = 150  # explanation length cap a request may ask for
    default_new_tokens: int = 96  # used when a request names none
    max_explanation_chars: int = 2000  # an explanation typed into Reconstruct
    max_messages: int = 32  # turns of a chat
    max_top_k: int = 20  # top next tokens shown per position
    max_queue: int = 32  # jobs waiting; more gets 429
    max_rows_per_page: int = 500  # rows returned by one /api/rows call
    max_body_bytes: int = 1_000_000  # a request body (checked before it is read)

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
