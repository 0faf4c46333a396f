"""Labellers: the `Labeller` base class, the registry, labeller options and the ``label``
stage's config. A labeller sees only the text prefix of a row (never the vector) and writes an
explanation in the label format (`nlakit.labels.format`).

Built-in labellers:
  * ``local``   any instruct model `load_model` can load (default: the store's target model);
                chat-templated one-shot prompt, left-padded batched ``generate``.
  * ``openai``  any OpenAI-compatible chat-completions endpoint (`nlakit.labels.openai`).
  * ``context`` deterministic and grounded in the target model: kind of text (rules), the last
                words of the context (quoted), and the target's own top-k next-token predictions
                (`nlakit.labels.context`).
  * ``nla``     a trained AV's own explanations of the rows' vectors: not a warm start but the
                AR's training data (`nlakit.train.label_ar`; the one labeller that reads the
                vector, through the AV).
Add your own by subclassing `Labeller` and calling `register_labeller`, or by an entry point in
the group ``nlakit.labellers`` that names the class.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from nlakit.config import hint, load_ref
from nlakit.errors import NLAError
from nlakit.extract.store import AR_SFT, AV_SFT, HELDOUT
from nlakit.labels.cache import LabelFailure, LabelRow
from nlakit.labels.format import PROMPT_VERSION, ParsedLabel, parse_label
from nlakit.model.load import resolve_model, weights_hash

DEFAULT_SPLITS = (AV_SFT, AR_SFT, HELDOUT)  # heldout: the eval's `label` baseline
ENTRY_POINT_GROUP = "nlakit.labellers"


# ---- the stage config --------------------------------------------------------------------


def split_list(value, stage: str) -> list[str]:
    """Split names from a list or a comma-separated string; NLAError when there are none."""
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    value = list(value)
    if not value:
        raise NLAError(f"{stage}: no splits to label")
    return value


@dataclass
class LabelConfig:
    """The ``label`` stage: which labeller labels which rows of the activation store."""

    labeller: str = field(default="context", metadata=hint(
        "local, openai, context, or a registered/entry-point labeller"))
    splits: list[str] | str = field(default_factory=lambda: list(DEFAULT_SPLITS), metadata=hint(
        "splits to label (comma-separated on the command line)"))
    max_rows: int | None = field(default=None, metadata=hint("at most this many rows per split"))
    options: dict = field(default_factory=dict, metadata=hint(
        "the labeller's options (see LabellerOptions); another option is an error"))

    def __post_init__(self):
        self.splits = split_list(self.splits, "label")
        if self.max_rows is not None and self.max_rows < 1:
            raise NLAError(f"label: max_rows must be >= 1, got {self.max_rows}")
        if not isinstance(self.options, dict):
            raise NLAError(f"label: options must be a mapping, got {self.options!r}")
        cls = get_labeller_class(self.labeller)
        check_options(f"the {self.labeller!r} labeller", self.options, cls.OPTIONS)


@dataclass
class LabellerOptions:
    """The options of the built-in labellers (each takes the ones in its ``OPTIONS``); on the
    command line a flag each, in a pipeline config the ``label.options`` mapping."""

    model: str | None = field(default=None, metadata=hint(
        "local/context: model to run (default: the store's target model)"))
    dtype: str | None = field(default=None, metadata=hint(
        "local/context: float32, bfloat16, auto ... (the device's)"))
    device: str | None = field(default=None, metadata=hint("local/context: cpu, cuda, auto (cpu)"))
    batch_size: int | None = field(default=None, metadata=hint(
        "local/context: rows per batch (default 8 local, 32 context)"))
    temperature: float | None = field(default=None, metadata=hint(
        "local/openai: sampling temperature (default 0: greedy)"))
    top_p: float | None = field(default=None, metadata=hint(
        "local/openai: nucleus sampling (0.9 local, none openai)"))
    max_new_tokens: int | None = field(default=None, metadata=hint(
        "local/openai: cap on generated tokens (default 64 local, 200 openai)"))
    seed: int | None = field(default=None, metadata=hint("local: sampling seed (0)"))
    max_prefix_chars: int | None = field(default=None, metadata=hint(
        "local/openai: show at most the last N characters of the prefix (default 300 "
                "local, 2000 openai)"))
    top_k: int | None = field(default=None, metadata=hint("context: predictions shown (3)"))
    n_words: int | None = field(default=None, metadata=hint(
        "context: last words of the context quoted (6; style v1)"))
    keep_unfinished: bool | None = field(default=None, metadata=hint(
        "nla: keep explanations cut at the length cap as labels (on)"))
    av: str | None = field(default=None, metadata=hint(
        "nla: the trained AV directory whose greedy explanations are the labels"))
    style: str | None = field(default=None, metadata=hint(
        "context: label format, v1 (kind, quoted last words, predictions), tail "
                "(current token first, kind + predictions, then the verbatim last tokens last, "
                "for an AR that reads raw text), tail_only (tail without kind and "
                "predictions) or tail_back (tail, plus the 3 tokens before the current one, "
                "newest first, on the second line); see docs/labels.md (v1)"))
    tail_tokens: int | None = field(default=None, metadata=hint(
        "context: tokens of the verbatim ending in style tail (8)"))
    base_url: str | None = field(default=None, metadata=hint(
        "openai: endpoint base, e.g. https://api.openai.com/v1 (required for openai)"))
    api_model: str | None = field(default=None, metadata=hint(
        "openai: model name at the endpoint (required for openai)"))
    api_key_env: str | None = field(default=None, metadata=hint(
        "openai: environment variable holding the key (default OPENAI_API_KEY)"))
    no_api_key: bool | None = field(default=None, metadata=hint(
        "openai: send no key (local servers without authentication; off)"))
    concurrency: int | None = field(default=None, metadata=hint(
        "openai: concurrent requests (default 8)"))
    max_requests: int | None = field(default=None, metadata=hint(
        "openai: hard budget of HTTP requests for this run (retries count; none)"))
    max_retries: int | None = field(default=None, metadata=hint(
        "openai: retries per request on 429/5xx/timeouts (default 5)"))
    timeout: float | None = field(default=None, metadata=hint(
        "openai: seconds per request (default 60)"))


def check_options(what: str, options: dict, allowed) -> None:
    """Refuse options that `what` does not take (allowed None: it takes any)."""
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if unknown:
        raise NLAError(f"option(s) {', '.join(unknown)} do not apply to {what}; it takes "
                       f"{', '.join(allowed) or 'no options'}")


# ---- labellers --------------------------------------------------------------------------------


class Labeller:
    """Base class: turn rows into raw labeller outputs (text holding ``<explanation>`` tags).

    Subclasses set ``kind``, implement `identity` (everything that changes the output: it keys
    the cache) and `label_batch`; they may override `iter_labels` to yield results as they
    complete, `parse` for another output format, and `from_options` for CLI construction.
    """

    kind: ClassVar[str] = "base"
    # the option names `from_options` takes; another option is an error (None: take any)
    OPTIONS: ClassVar[tuple[str, ...] | None] = None
    prompt_version: str = PROMPT_VERSION
    batch_size: int = 8

    @classmethod
    def from_options(cls, store, options: dict) -> Labeller:
        """Build from CLI/library options (already checked against `OPTIONS`)."""
        return cls()

    def identity(self) -> dict:
        """JSON-able description of everything that determines the output (keys the cache)."""
        return {"kind": self.kind, "prompt_version": self.prompt_version}

    def provenance(self) -> dict:
        """What meta.yaml records about the labeller (identity plus non-key details)."""
        return dict(self.identity())

    def batch_order(self, row: LabelRow):
        """Sort key of rows to label: rows with close keys share a batch. By default similar
        prefix lengths (less padding in generation)."""
        return len(row.prefix)

    def label_batch(self, rows: list[LabelRow]) -> list[str | LabelFailure]:
        raise NotImplementedError

    def iter_labels(self, rows: list[LabelRow]) -> Iterator[tuple[int, str | LabelFailure]]:
        """Yield (index into rows, raw output) as labels complete."""
        results = self.label_batch(rows)
        if len(results) != len(rows):
            raise NLAError(f"labeller {self.kind!r} returned {len(results)} outputs for "
                           f"{len(rows)} rows")
        yield from enumerate(results)

    def parse(self, raw: str) -> ParsedLabel:
        return parse_label(raw)

    def prepare(self) -> None:
        """Load what labelling needs (called only when some row is not cached)."""

    def close(self) -> None:
        """Release resources (models, thread pools)."""


_REGISTRY: dict[str, type[Labeller] | str] = {
    "local": "nlakit.labels.local:LocalLabeller",
    "context": "nlakit.labels.context:ContextLabeller",
    "openai": "nlakit.labels.openai:OpenAILabeller",
    "nla": "nlakit.train.label_ar:VerbalizerLabeller",
}


def register_labeller(name: str, cls: type[Labeller]) -> None:
    """Make a Labeller subclass available as ``--labeller name``."""
    if not (isinstance(cls, type) and issubclass(cls, Labeller)):
        raise NLAError(f"{cls!r} is not a subclass of nlakit.labels.Labeller")
    _REGISTRY[name] = cls


def labeller_names() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_labeller_class(name: str) -> type[Labeller]:
    """A labeller class by registry name or entry point (group ``nlakit.labellers``)."""
    from importlib.metadata import entry_points

    found = _REGISTRY.get(name)
    if found is None:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            raise NLAError(f"unknown labeller {name!r}; available: {', '.join(labeller_names())}"
                           " (add one with register_labeller or an entry point in the group "
                           f"{ENTRY_POINT_GROUP!r})")
        found = eps[0].load()
    cls = load_ref(found) if isinstance(found, str) else found
    if not (isinstance(cls, type) and issubclass(cls, Labeller)):
        raise NLAError(f"labeller {name!r} resolves to {cls!r}, not a Labeller subclass")
    return cls


def make_labeller(name: str, store=None, **options) -> Labeller:
    """Build a labeller by name; ``options`` are its settings (None values mean default)."""
    options = {k: v for k, v in options.items() if v is not None}
    cls = get_labeller_class(name)
    check_options(f"the {name!r} labeller", options, cls.OPTIONS)
    return cls.from_options(store, options)


def _store_model_spec(store, options: dict) -> str:
    spec = options.get("model") or (store.meta["model"].get("spec") if store else None)
    if not spec:
        raise NLAError("no model given and the activation store records none; pass --model")
    return str(spec)


def weights_id(spec: str) -> str:
    return weights_hash(resolve_model(spec))


class ModelLabeller(Labeller):
    """A labeller that runs a model given by the ``model`` option (default: the store's
    target); its other options are its constructor's keyword arguments."""

    @classmethod
    def from_options(cls, store, options):
        return cls(_store_model_spec(store, options),
                   **{k: v for k, v in options.items() if k != "model"})


__all__ = ["DEFAULT_SPLITS", "ENTRY_POINT_GROUP", "LabelConfig", "Labeller", "LabellerOptions",
           "ModelLabeller", "check_options", "get_labeller_class", "labeller_names",
           "make_labeller", "register_labeller"]
