"""What `nlakit serve` reads, where it listens, and its request limits: plain dataclasses with
a help string per field (the CLI's flags are generated from them), importable without the web
stack."""

from __future__ import annotations

from dataclasses import dataclass, field

from nlakit.apps.serve.limits import RequestError, ServeLimits
from nlakit.config import hint
from nlakit.errors import NLAError

__all__ = ["RequestError", "ServeInputs", "ServeLimits"]


@dataclass
class ServeInputs:
    """What `nlakit serve` reads and where it listens (the limits are `ServeLimits`)."""

    nla: str | None = field(default=None, metadata=hint(
        "NLA directory (holding av/ and ar/); or give --av and --ar"))
    av: str | None = field(default=None, metadata=hint("AV directory (official layout)"))
    ar: str | None = field(default=None, metadata=hint("AR directory (official layout)"))
    model: str | None = field(default=None, metadata=hint(
        "target model spec, when the NLA's nla_meta.yaml names none (None: the NLA's own)"))
    acts: str | None = field(default=None, metadata=hint(
        "activation store of the NLA's layer: true activations for Reconstruct and the "
        "per-row edits, contexts, document kinds (None: the store named in eval.json)"))
    eval: str | None = field(default=None, metadata=hint(
        "eval directory, eval.json, or pipeline run directory (its audit.json is found next "
        "to it) for Browse"))
    audit: str | None = field(default=None, metadata=hint("audit directory or audit.json "
                                                              "(None: found next to --eval)"))
    host: str = field(default="127.0.0.1", metadata=hint(
        "address to bind; anything but loopback is reachable by others and logs a warning"))
    port: int = field(default=8000, metadata=hint("TCP port"))
    device: str | None = field(default=None, metadata=hint("cpu (default), cuda, cuda:N"))
    chunk: int = field(default=16, metadata=hint(
        "positions per batched generation of an explain job (progress granularity)"))

    def __post_init__(self):
        if (self.nla is None) == (self.av is None or self.ar is None) or \
                (self.nla is not None and (self.av is not None or self.ar is not None)):
            raise NLAError("serve: pass --nla NLA_DIR, or both --av AV_DIR and --ar AR_DIR")
        if not 0 <= int(self.port) <= 65535:
            raise NLAError(f"serve: port must be 0..65535, got {self.port}")
        if int(self.chunk) < 1:
            raise NLAError(f"serve: chunk must be >= 1, got {self.chunk}")
