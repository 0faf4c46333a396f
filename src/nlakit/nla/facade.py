"""The NLA facade: load a verbalizer/reconstructor pair and explain, reconstruct and score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nlakit import metrics
from nlakit.errors import NLAError
from nlakit.fileio import write_yaml
from nlakit.model.hooks import forward_to_layer
from nlakit.model.lm_head import next_token_probs
from nlakit.model.load import load_model, resolve_device, resolve_dtype
from nlakit.nla.checkpoint import (
    ROLE_ALIASES,
    load_value_head,
    read_meta,
    save_ar_dir,
    save_av_dir,
    verify_ar_tokenizer,
    verify_av_tokenizer,
)
from nlakit.nla.prompt import Explanation, check_vectors
from nlakit.nla.reconstructor import Reconstructor
from nlakit.nla.verbalizer import Verbalizer


@dataclass
class TokenExplanation:
    """One explained token of a text: what the AV said and how well the AR rebuilt it."""

    position: int
    token: str
    explanation: str
    complete: bool
    mse_nrm: float
    cos: float
    fve_nrm: float
    reconstruction: torch.Tensor  # [d]
    claims: dict | None = None  # verdict -> 1/0/fraction/NaN (`nlakit.nla.claims`), when verified
    verification: str | None = None  # one marked line per stated field


@dataclass
class BestOf:
    """`NLA.best_of`'s result: every candidate (row-major, n per vector, greedy first), the AR's
    scores of each (`NLA.score`'s dict), and the index of each vector's kept candidate."""

    candidates: list[Explanation]
    scores: dict
    kept: torch.Tensor  # [m] indices into candidates
    n: int

    @property
    def explanations(self) -> list[Explanation]:
        return [self.candidates[int(j)] for j in self.kept]

    @property
    def reconstructions(self) -> torch.Tensor:
        return self.scores["reconstruction"][self.kept]


def load_av(av_dir: Path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(av_dir, "av")
    tok = AutoTokenizer.from_pretrained(av_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    nl = meta.get("nlakit", {})
    if nl.get("weights") == "adapter":
        from peft import PeftModel

        spec = nl.get("target_model", {}).get("spec")
        if not spec:
            raise NLAError(f"{av_dir} holds LoRA adapters but names no target model spec")
        base, _ = load_model(spec, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, av_dir).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(av_dir, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    d = model.get_input_embeddings().weight.shape[1]
    if int(meta["d_model"]) != d:
        raise NLAError(f"{av_dir}: nla_meta.yaml says d_model {meta['d_model']}, the model has {d}")
    marker = verify_av_tokenizer(tok, meta, str(av_dir))
    av = Verbalizer(model, tok, marker, float(meta["extraction"]["injection_scale"]),
                    meta["template"])
    from nlakit.nla.hedge import check_hedge  # lazily: it imports the claim checks

    decoding = dict(meta.get("decoding", {}))
    av.hedge = check_hedge(decoding.pop("hedge", 0.0), f"{av_dir}/nla_meta.yaml decoding.hedge")
    try:  # the checkpoint's decoding settings, validated, over the defaults
        av.decoding = av.decoding_settings(**decoding)
    except TypeError as e:
        raise NLAError(f"{av_dir}/nla_meta.yaml: unknown setting under `decoding:` ({e}); "
                       "the known ones are no_repeat_ngram_size, repetition_penalty and "
                       "hedge") from e
    return av, meta


def _adapter_ar_body(ar_dir: Path, meta: dict, dtype, device):
    """An AR kept as LoRA adapters: the target truncated after the stored layer, adapters
    merged in (the value head is read separately)."""
    from peft import PeftModel

    from nlakit.nla.reconstructor import truncate_model

    spec = meta.get("nlakit", {}).get("target_model", {}).get("spec")
    layer = meta.get("extraction", {}).get("layer")
    if not spec or layer is None:
        raise NLAError(f"{ar_dir} holds LoRA adapters but names no target model spec or layer")
    base, _ = load_model(spec, dtype=dtype, device=device)
    want = meta["nlakit"]["target_model"].get("weights_hash")
    have = getattr(base, "nlakit_source", {}).get("weights_hash")
    if want and have and want != have:
        raise NLAError(f"{ar_dir} was trained on target weights {want}, but {spec!r} has {have}")
    return PeftModel.from_pretrained(truncate_model(base, int(layer)), ar_dir).merge_and_unload()


def load_ar(ar_dir: Path, dtype, device, av_tokenizer=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(ar_dir, "ar")
    if meta.get("nlakit", {}).get("weights") == "adapter":
        body = _adapter_ar_body(ar_dir, meta, dtype, device)
    else:
        body = AutoModelForCausalLM.from_pretrained(ar_dir, dtype=dtype)
    body.to(device).eval().requires_grad_(False)
    d = int(meta["d_model"])
    if body.get_input_embeddings().weight.shape[1] != d:
        raise NLAError(f"{ar_dir}: d_model {d} in nla_meta.yaml disagrees with the model")
    layer = int(body.config.num_hidden_layers) - 1
    for key, stated in (("extraction.layer", meta.get("extraction", {}).get("layer")),
                        ("extraction_layer_index", meta.get("extraction_layer_index")),
                        ("critic.extraction_layer_index",
                         (meta.get("critic") or {}).get("extraction_layer_index"))):
        if stated is not None and int(stated) != layer:
            raise NLAError(f"{ar_dir}: config.json has {layer + 1} blocks but nla_meta.yaml "
                           f"says {key} {stated}; expected num_hidden_layers = layer + 1")
    try:
        tok = AutoTokenizer.from_pretrained(ar_dir)
    except (OSError, ValueError):
        if av_tokenizer is None:
            raise NLAError(f"{ar_dir} has no tokenizer") from None
        tok = av_tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    verify_ar_tokenizer(tok, meta, str(ar_dir))
    head = load_value_head(ar_dir, d).to(device)
    return Reconstructor(body, head, tok, meta["template"]), meta


POSITIONS_FORMS = "'last', 'all', an int, a list of ints, or a string like '3,7,-1'"


def parse_positions(spec) -> str | list[int]:
    """'last' / 'all' / a list of token indices, from any of the accepted forms."""
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("last", "all"):
            return text
        try:
            return [int(p) for p in text.split(",")]
        except ValueError:
            raise NLAError(f"positions must be {POSITIONS_FORMS}; got {spec!r}") from None
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [spec]
    try:
        items = list(spec)
    except TypeError:
        raise NLAError(f"positions must be {POSITIONS_FORMS}; got {spec!r}") from None
    if not items or not all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        raise NLAError(f"positions must be {POSITIONS_FORMS}; got {spec!r}")
    return [int(p) for p in items]


def resolve_positions(spec, n_tokens: int) -> list[int]:
    """Absolute token indices of a text of `n_tokens` tokens (negative counts from the end)."""
    parsed = parse_positions(spec)
    if parsed == "last":
        return [n_tokens - 1]
    if parsed == "all":
        return list(range(n_tokens))
    chosen = [p + n_tokens if p < 0 else p for p in parsed]
    bad = [p for p, c in zip(parsed, chosen) if not 0 <= c < n_tokens]
    if bad:
        raise NLAError(f"positions {bad} out of range for a text of {n_tokens} tokens")
    return chosen

class NLA:
    """A natural language autoencoder: `av` (vector -> text) and `ar` (text -> vector)."""

    def __init__(self, av: Verbalizer, ar: Reconstructor, av_meta: dict, ar_meta: dict,
                 target=None):
        if av.d_model != ar.d_model:
            raise NLAError(f"AV d_model {av.d_model} != AR d_model {ar.d_model}")
        t_av = av_meta.get("nlakit", {}).get("target_model", {}).get("weights_hash")
        t_ar = ar_meta.get("nlakit", {}).get("target_model", {}).get("weights_hash")
        if t_av and t_ar and t_av != t_ar:
            raise NLAError(f"the AV was trained for target {t_av} and the AR for {t_ar}; they "
                           "are not a pair")
        layer_av = av_meta.get("extraction", {}).get("layer")
        if layer_av is not None and int(layer_av) != ar.layer:
            raise NLAError(f"the AV reads layer {layer_av} but the AR rebuilds layer {ar.layer}")
        self.av, self.ar, self.av_meta, self.ar_meta = av, ar, av_meta, ar_meta
        self._target = target

    # ---- loading and saving -----------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, *, av: str | Path | None = None,
             ar: str | Path | None = None, device: str | None = None, dtype=None,
             target=None) -> NLA:
        """Load ``NLA.load(NLA_DIR)`` (nlakit layout: NLA_DIR/av, NLA_DIR/ar), an NLA shipped
        in the package by name (``NLA.load("smollm2-135m")``, see `nlakit.nla.pretrained`), or a
        pair
        of directories in the official release layout: ``NLA.load(av=AV_DIR, ar=AR_DIR)``.
        target: an optional loaded ``(model, tokenizer)`` of the target for `explain_text`."""
        if path is not None:
            from nlakit.nla.pretrained import resolve

            root = resolve(path) or Path(path)
            if (root / "nla_meta.yaml").is_file():
                role = ROLE_ALIASES.get(str(__import__("yaml").safe_load(
                    (root / "nla_meta.yaml").read_text()).get("role")), "?")
                raise NLAError(f"{root} is a single {role.upper()} directory; load a pair with "
                               "NLA.load(av=AV_DIR, ar=AR_DIR)")
            av, ar = av or root / "av", ar or root / "ar"
        if av is None or ar is None:
            raise NLAError("pass an NLA directory, or both av= and ar= directories")
        av, ar = Path(av), Path(ar)
        for role, d in (("AV", av), ("AR", ar)):
            if not d.is_dir():
                raise NLAError(f"{role} directory {d} does not exist (train it with "
                               f"`nlakit train {role.lower()}`)")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        verbalizer, av_meta = load_av(av, torch_dtype, dev)
        reconstructor, ar_meta = load_ar(ar, torch_dtype, dev, verbalizer.tokenizer)
        return cls(verbalizer, reconstructor, av_meta, ar_meta, target=target)

    @classmethod
    def from_target(cls, target, layer: int, *, injection_scale: float,
                    dataset_stats: dict | None = None, marker: str | None = None) -> NLA:
        """An *untrained* NLA built from a loaded target ``(model, tokenizer)``: the AV is a
        copy of the target, the AR its truncation with an identity head. A starting point for
        training and a reference for tests; its explanations mean nothing yet."""
        import copy

        from nlakit.model.arch import check_layer
        from nlakit.nla.checkpoint import ar_meta, av_meta
        from nlakit.nla.prompt import DEFAULT_AV_TEMPLATE, choose_marker
        from nlakit.nla.reconstructor import DEFAULT_AR_TEMPLATE

        model, tok = target
        layer = check_layer(model, layer)
        mk = choose_marker(tok, DEFAULT_AV_TEMPLATE, marker)
        av = Verbalizer(copy.deepcopy(model), tok, mk, injection_scale, DEFAULT_AV_TEMPLATE)
        ar = Reconstructor.from_target(model, tok, layer, DEFAULT_AR_TEMPLATE)
        nl = {"target_model": dict(getattr(model, "nlakit_source", {})), "layer": layer,
              "dataset_stats": dict(dataset_stats or {}), "weights": "merged"}
        d = ar.d_model
        am = av_meta(d_model=d, layer=layer, injection_scale=injection_scale, marker=mk,
                     av_template=DEFAULT_AV_TEMPLATE, ar_template=DEFAULT_AR_TEMPLATE, nlakit=nl,
                     stage="untrained")
        rm = ar_meta(d_model=d, layer=layer, ar_template=DEFAULT_AR_TEMPLATE, nlakit=dict(nl),
                     stage="untrained")
        am["template"], rm["template"] = DEFAULT_AV_TEMPLATE, DEFAULT_AR_TEMPLATE
        return cls(av, ar, am, rm, target=target)

    def save(self, path: str | Path, layout: str = "nlakit") -> Path:
        """Write ``path/av`` and ``path/ar``: merged weights, or LoRA adapters for a half whose
        model is a peft model (RL's keep_adapters export).

        layout="official" writes exactly the two directories of the official release (plain
        HF AV model; truncated AR with value_head.safetensors); "nlakit" adds ``nla.yaml``.
        """
        if layout not in ("nlakit", "official"):
            raise NLAError(f"unknown layout {layout!r}: use 'nlakit' or 'official'")
        adapters = [hasattr(m, "peft_config") for m in (self.av.model, self.ar.body)]
        if layout == "official" and any(adapters):
            raise NLAError("the official layout holds merged weights; load this NLA from disk "
                           "(adapters are merged on load) and save that")
        root = Path(path)
        av_meta = {k: v for k, v in self.av_meta.items() if k != "template"}
        ar_meta = {k: v for k, v in self.ar_meta.items() if k != "template"}
        for meta, adapter in zip((av_meta, ar_meta), adapters):
            meta.setdefault("nlakit", {})
            meta["nlakit"] = {**meta["nlakit"], "weights": "adapter" if adapter else "merged"}
        save_av_dir(root / "av", self.av.model, self.av.tokenizer, av_meta)
        save_ar_dir(root / "ar", self.ar.body, self.ar.head, self.ar.tokenizer, ar_meta)
        if layout == "nlakit":
            write_yaml(root / "nla.yaml", {"kind": "nlakit_nla", "av": "av", "ar": "ar",
                                           "layer": self.layer, "d_model": self.d_model,
                                           "target_model": self.target_info})
        return root

    # ---- facts ---------------------------------------------------------------------------

    @property
    def layer(self) -> int:
        return self.ar.layer

    @property
    def d_model(self) -> int:
        return self.ar.d_model

    @property
    def target_info(self) -> dict:
        return dict(self.av_meta.get("nlakit", {}).get("target_model", {}))

    @property
    def dataset_stats(self) -> dict:
        return dict(self.av_meta.get("nlakit", {}).get("dataset_stats", {}))

    def target(self):
        """The frozen target model (loaded on first use from the spec in the sidecar)."""
        if self._target is None:
            info = self.target_info
            if not info.get("spec"):
                raise NLAError("this NLA names no target model; pass target=(model, tokenizer) "
                               "to NLA.load")
            model, tok = load_model(info["spec"], device=str(self.ar.device))
            have = getattr(model, "nlakit_source", {}).get("weights_hash")
            if info.get("weights_hash") and have and have != info["weights_hash"]:
                raise NLAError(f"target {info['spec']!r} has weights {have}, but this NLA was "
                               f"trained on {info['weights_hash']}")
            self._target = (model, tok)
        return self._target

    # ---- the API -------------------------------------------------------------------------

    def explain(self, vectors, *, n: int = 1, temperature: float | None = None,
                top_p: float = 1.0, max_new_tokens: int = 150, batch_size: int = 32,
                seed: int | None = None, no_repeat_ngram_size: int | None = None,
                repetition_penalty: float | None = None,
                hedge: float | None = None) -> list[Explanation]:
        """Explanations of [m, d] vectors: a flat list of m*n, vector 0's n samples first.
        temperature defaults to 0 (greedy) for n=1 and 1.0 for n>1; the decoding settings
        default to the AV checkpoint's own (`decoding:` in its nla_meta.yaml). hedge: leave
        out the claims the AV wrote with less than this confidence (`nlakit.nla.hedge`;
        default the AV's own `hedge`, 0 = keep every claim)."""
        if temperature is None:
            temperature = 0.0 if n == 1 else 1.0
        exps = self.av.generate(vectors, n=n, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                no_repeat_ngram_size=no_repeat_ngram_size,
                                repetition_penalty=repetition_penalty)
        from nlakit.nla import hedge as hedging  # lazily: it imports the claim checks

        threshold = self.av.hedge if hedge is None else hedging.check_hedge(hedge, "hedge")
        if threshold:
            v = check_vectors(vectors, self.d_model).repeat_interleave(n, dim=0)
            exps = hedging.hedge(self.av, v, exps, threshold, batch_size)
        return exps

    def candidates(self, vectors, n: int, *, temperature: float = 1.0,
                   max_new_tokens: int = 150, batch_size: int = 32, seed: int | None = None,
                   greedy: list[Explanation] | None = None,
                   hedge: float | None = None) -> list[Explanation]:
        """n candidate explanations per vector for best-of-n, row-major: the greedy one first
        (so the best of n is never worse, by the AR, than greedy decoding), then n-1 samples.
        `greedy`: the vectors' greedy explanations when the caller already has them; hedge as
        in `explain`."""
        if greedy is None:
            greedy = self.explain(vectors, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, hedge=hedge)
        elif len(greedy) != len(vectors):
            raise NLAError(f"{len(greedy)} greedy explanations for {len(vectors)} vectors")
        if n == 1:
            return list(greedy)
        k = n - 1
        samples = self.explain(vectors, n=k, temperature=temperature, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, seed=seed, hedge=hedge)
        return [e for i, g in enumerate(greedy) for e in (g, *samples[i * k:(i + 1) * k])]

    def best_of(self, vectors, n: int, *, max_new_tokens: int = 150, batch_size: int = 32,
                seed: int | None = 0, greedy: list[Explanation] | None = None,
                rawvar: float | None = None, hedge: float | None = None) -> BestOf:
        """Best-of-n reranking, the one implementation (eval's nla_best_of_N, `explain_text`,
        the viewer): `candidates` (greedy first, then n-1 samples at temperature 1) scored by
        the AR against the true vectors (`score`), and each vector's lowest-mse_nrm one kept."""
        v = check_vectors(vectors, self.d_model)
        exps = self.candidates(v, n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               seed=seed, greedy=greedy, hedge=hedge)
        scores = self.score([e.text for e in exps], v.repeat_interleave(n, 0), rawvar=rawvar,
                            batch_size=batch_size)
        kept = metrics.best_candidates(scores["reconstruction"], v, n)
        return BestOf(exps, scores, kept, n)

    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[n, d] AR reconstructions of explanation texts."""
        return self.ar.reconstruct(texts, batch_size=batch_size)

    def score(self, texts: list[str], vectors, rawvar: float | None = None,
              batch_size: int = 32) -> dict:
        """Per-row mse_nrm, cos and fve_nrm of the AR's reading of `texts` against `vectors`.

        fve_nrm's denominator: `rawvar` if given, else the training store's rawvar from the
        sidecar, else the rawvar of `vectors` themselves (needs several rows)."""
        v = check_vectors(vectors, self.d_model)
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) != v.shape[0]:
            raise NLAError(f"{len(texts)} texts for {v.shape[0]} vectors")
        pred = self.reconstruct(texts, batch_size=batch_size)
        denom = rawvar if rawvar is not None else self.dataset_stats.get("rawvar")
        if denom is None:
            if v.shape[0] < 2:
                raise NLAError("no rawvar in this checkpoint: pass rawvar= or several vectors")
            denom = metrics.rawvar(v)
        return {"mse_nrm": metrics.mse_nrm(pred, v), "cos": metrics.cos(pred, v),
                "fve_nrm": metrics.fve_nrm(pred, v, denom), "rawvar": float(denom),
                "reconstruction": pred}

    def activations(self, text: str) -> tuple[list[int], torch.Tensor]:
        """Token ids and block-K activations [t, d] of `text` under the target model."""
        if not isinstance(text, str) or not text.strip():
            raise NLAError("empty text: nothing to explain")
        model, tok = self.target()
        ids = tok(text, add_special_tokens=True)["input_ids"]
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and len(ids) > limit:
            raise NLAError(f"text is {len(ids)} tokens; the target's context is {limit}")
        t = torch.tensor([ids], device=model.device)
        hidden = forward_to_layer(model, t, torch.ones_like(t), self.layer)
        return ids, hidden[0].float().cpu()

    def explain_text(self, text: str, positions="last", *, best_of: int = 1,
                     max_new_tokens: int = 150, seed: int | None = 0,
                     verify: bool = False) -> list[TokenExplanation]:
        """Explain the target's block-K state at chosen tokens of `text`.

        positions: "last", "all", token indices (negative counts from the end) as a list, an
        int, or a comma-separated string like "-3,-2,-1" (the CLI's form).
        best_of > 1 keeps, of the greedy explanation and best_of - 1 samples (temperature 1),
        the one the AR reconstructs best; otherwise greedy decoding. verify: check every
        claim of each explanation against the text and the target's real next-token
        distribution (`nlakit.nla.claims`), into ``claims`` and ``verification``."""
        ids, acts = self.activations(text)
        chosen = resolve_positions(positions, len(ids))
        vecs = acts[chosen]
        best = self.best_of(vecs, max(1, int(best_of)), max_new_tokens=max_new_tokens, seed=seed)
        exps, scores = best.candidates, best.scores
        tok = self.target()[1]
        out = []
        for pos, j in zip(chosen, best.kept.tolist()):
            out.append(TokenExplanation(
                position=pos, token=tok.decode([ids[pos]]), explanation=exps[j].text,
                complete=exps[j].complete, mse_nrm=float(scores["mse_nrm"][j]),
                cos=float(scores["cos"][j]), fve_nrm=float(scores["fve_nrm"][j]),
                reconstruction=scores["reconstruction"][j]))
        if verify:
            checked = self.verify_claims(ids, chosen, [r.explanation for r in out])
            for r, (verdicts, lines) in zip(out, checked):
                r.claims, r.verification = verdicts, lines
        return out

    def verify_claims(self, ids: list[int], positions: list[int],
                      explanations: list[str]) -> list[tuple[dict, str]]:
        """(verdicts, marked lines) per explanation: its claims checked against the text `ids`
        up to its position and the target's next-token distribution there (`nlakit.nla.claims`;
        one forward over the whole text)."""
        from nlakit.nla.claims import describe, parse_claims, truth_from_probs
        from nlakit.nla.claims import verify as check

        if not positions:
            return []
        model, tok = self.target()
        probs = next_token_probs(model, [ids], read_at=[list(positions)])
        out = []
        for pos, text, p in zip(positions, explanations, probs):
            c = parse_claims(text)
            truth = truth_from_probs(tok, ids[:pos + 1], p, c.prediction_tokens)
            verdicts = check(c, truth)
            out.append((verdicts, describe(c, verdicts, truth)))
        return out
