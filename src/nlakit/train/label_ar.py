"""The ``nla`` labeller: a trained AV's own greedy explanations of the rows' activations.

The one labeller that reads the vector (through the AV, looked up by row id in the store): its
labels are not a warm start written from the text but training data for an AR that should learn
to read what the AV really writes. An AR trained only on warm-start labels can score below a
constant on the AV's explanations until it is trained on them (a public small-model replication
fixed that with 25-50 online steps); the pipeline's optional ``label_ar`` stage does it once,
before RL, with this labeller (``nlakit label --labeller nla --av AV_DIR --splits ar_sft``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nlakit.config import hint
from nlakit.errors import NLAError
from nlakit.extract.store import AR_SFT
from nlakit.labels.core import Labeller, split_list


class VerbalizerLabeller(Labeller):
    """Greedy explanations of a trained AV (``av``: its directory) for the store's rows."""

    kind = "nla"
    OPTIONS = ("av", "device", "batch_size", "max_new_tokens", "keep_unfinished")
    prompt_version = "av-greedy-v1"

    def __init__(self, store, av: str | Path, *, device: str | None = None,
                 batch_size: int = 128, max_new_tokens: int = 96, keep_unfinished: bool = True):
        if store is None:
            raise NLAError("the nla labeller needs the activation store (it reads the vectors)")
        self.store, self.av_dir = store, Path(av)
        if not (self.av_dir / "nla_meta.yaml").is_file():
            raise NLAError(f"--av {self.av_dir} is not an AV directory (no nla_meta.yaml)")
        self.device, self.batch_size = device, int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.keep_unfinished = bool(keep_unfinished)
        from nlakit.nla.checkpoint import av_digest

        self._digest = av_digest(self.av_dir)
        self._av = None

    @classmethod
    def from_options(cls, store, options):
        if not options.get("av"):
            raise NLAError("the nla labeller needs --av AV_DIR (a trained AV)")
        return cls(store, **options)

    def identity(self) -> dict:
        return {"kind": self.kind, "prompt_version": self.prompt_version, "av": self._digest,
                "settings": {"max_new_tokens": self.max_new_tokens,
                             "keep_unfinished": self.keep_unfinished}}

    def provenance(self) -> dict:
        return {**self.identity(), "av_dir": str(self.av_dir.resolve()),
                "batch_size": self.batch_size}

    def prepare(self) -> None:
        if self._av is None:
            from nlakit.model.load import resolve_device, resolve_dtype
            from nlakit.nla.facade import load_av

            dev = resolve_device(self.device)
            self._av, meta = load_av(self.av_dir, resolve_dtype(None, dev), dev)
            if int(meta["extraction"]["layer"]) != self.store.layer:
                raise NLAError(f"the AV reads layer {meta['extraction']['layer']} but the store "
                               f"holds layer {self.store.layer}")

    def batch_order(self, row):
        return row.row_id

    def label_batch(self, rows) -> list[str]:
        import torch

        from nlakit.extract.store import vectors_from_arrow
        from nlakit.nla.prompt import CLOSE_TAG, OPEN_TAG

        self.prepare()
        ids = [r.row_id for r in rows]
        table = self.store.rows(ids, ["row_id", "vector"])
        by_id = dict(zip(table.column("row_id").to_pylist(), range(table.num_rows)))
        if set(by_id) != set(ids):
            raise NLAError(f"rows {sorted(set(ids) - set(by_id))[:5]} are not in the store")
        vectors = vectors_from_arrow(table.column("vector"), self.store.d_model)
        v = torch.from_numpy(vectors[[by_id[i] for i in ids]].copy())
        exps = self._av.generate(v, n=1, temperature=0.0, max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size)
        # The AR must read what the AV really writes, loops cut at the cap included (the eval
        # scores those too); without keep_unfinished they keep no closing tag and are dropped.
        return [f"{OPEN_TAG}\n{e.text}\n" + (CLOSE_TAG if e.complete or self.keep_unfinished
                                               else "") for e in exps]

    def close(self) -> None:
        self._av = None


@dataclass
class ARLabelConfig:
    """The pipeline's optional ``label_ar`` stage: the trained AV's explanations of the AR's
    training rows, which the AR then trains on instead of the warm-start labels."""

    splits: list[str] | str = field(default_factory=lambda: [AR_SFT], metadata=hint(
        "splits the AV explains (the AR trains on ar_sft)"))
    max_new_tokens: int = field(default=96, metadata=hint("explanation length cap"))
    batch_size: int = field(default=128, metadata=hint(
        "rows per generation batch (speed only: 128 makes 1.4-1.5x the explanations "
                "per second of 32 on 2 CPU cores, docs/benchmarks.md)"))
    max_rows: int | None = field(default=None, metadata=hint("at most this many rows per split"))
    keep_unfinished: bool = field(default=True, metadata=hint(
        "keep explanations cut at the cap (the eval reads those too); false drops them"))

    def __post_init__(self):
        self.splits = split_list(self.splits, "label_ar")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise NLAError(f"label_ar: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise NLAError(f"label_ar: max_rows must be >= 1, got {self.max_rows}")
