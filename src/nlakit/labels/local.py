"""The ``local`` labeller: any instruct model `load_model` can load, run on this machine."""

from __future__ import annotations

import torch

from nlakit.fileio import stable_seed
from nlakit.labels.cache import LabelRow
from nlakit.labels.core import ModelLabeller, weights_id
from nlakit.labels.format import label_messages
from nlakit.model.arch import require_chat_template
from nlakit.model.generate import generate_continuations
from nlakit.model.load import load_model


class LocalLabeller(ModelLabeller):
    """An instruct model run locally: one-shot chat prompt, left-padded batched generation.

    The assistant turn is prefilled with ``<explanation>\\n`` and generation stops at the
    closing tag, so even a small model stays in the format more often.
    """

    kind = "local"
    OPTIONS = ("model", "dtype", "device", "batch_size", "max_new_tokens", "temperature",
               "top_p", "seed", "max_prefix_chars")
    PREFILL = "<explanation>\n"

    def __init__(self, model: str, *, dtype: str | None = None, device: str | None = None,
                 batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 0.9, seed: int = 0, max_prefix_chars: int = 300,
                 one_shot: bool = True, loaded: tuple | None = None):
        self.model_spec = model
        self.dtype, self.device = dtype, device
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.max_prefix_chars = int(max_prefix_chars)
        self.one_shot = bool(one_shot)
        self._weights = weights_id(model)
        self._loaded = loaded  # an already loaded (model, tokenizer) of this spec

    def identity(self) -> dict:
        return {"kind": self.kind, "model": self.model_spec, "weights_hash": self._weights,
                "prompt_version": self.prompt_version,
                "settings": {"temperature": self.temperature, "top_p": self.top_p,
                             "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                             "max_prefix_chars": self.max_prefix_chars,
                             "one_shot": self.one_shot}}

    def provenance(self) -> dict:
        return {**self.identity(), "batch_size": self.batch_size}

    def _load(self):
        if self._loaded is None:
            self._loaded = load_model(self.model_spec, dtype=self.dtype, device=self.device)
        require_chat_template(self._loaded[1], self.model_spec, "local labeller")
        return self._loaded

    def prepare(self) -> None:
        self._load()

    def prompts(self, rows: list[LabelRow]) -> list[str]:
        _, tok = self._load()
        return [tok.apply_chat_template(label_messages(r.prefix, self.max_prefix_chars,
                                                       self.one_shot),
                                        tokenize=False, add_generation_prompt=True)
                + self.PREFILL for r in rows]

    def label_batch(self, rows: list[LabelRow]) -> list[str]:
        model, tok = self._load()
        sampling = ({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
                    if self.temperature > 0 else {"do_sample": False})
        torch.manual_seed(stable_seed(self.seed, rows[0].row_id))
        new = generate_continuations(model, tok, self.prompts(rows),
                                     max_new_tokens=self.max_new_tokens, sampling=sampling,
                                     stop_strings=["</explanation>"])
        return [self.PREFILL + text for text in new]

    def close(self) -> None:
        self._loaded = None
