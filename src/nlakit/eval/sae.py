"""TopK sparse autoencoders on a store's activations: the ladder an NLA's text is read against.

A TopK SAE (Gao et al. 2024) encodes x as the k largest pre-activations of
W_enc (x - b_dec) + b_enc, passed through a ReLU, and decodes x' = W_dec^T z + b_dec, with
unit-norm decoder rows. Trained for k = 1, 4, 16, 64 on the store's training splits and scored
on the held-out rows with the eval's metrics (fve_nrm, and kl / ce_recovered by splicing, see
`nlakit.eval.splice`), it answers "how many sparse latents is the explanation worth?" (`worth_k`).

What the SAE sees. Inputs are the rows' *directions* scaled to sqrt(d): x = s·g/||g||, the space
mse_nrm lives in, because an NLA predicts directions only and is scored on them; each SAE's
reconstruction is scored (fve_nrm) and spliced (rescaled to the true norm) exactly like an NLA's
prediction. An SAE trained on raw activations would spend capacity on the norm, which no metric
here rewards.

Training data (`training_vectors`). The stored training rows are ~10 per document (a few
thousand vectors for a small store): far too few for 8×d latents. `source="tokens"` re-runs the
target over the training splits' documents and takes every eligible token (index >=
min_position, non-special: extraction's rule), which is how SAEs are trained anyway; the
held-out documents are never read. `source="rows"` uses the stored rows only.

Why not sae-lens. `pip install --dry-run sae-lens` (6.54.12) resolves beside this project's pins
without replacing torch or transformers, but brings 48 packages (transformer-lens, wandb, plotly,
nltk, statsmodels, opentelemetry, ...) for what is ~100 lines of torch here, and its trainer
streams activations from a TransformerLens model rather than from a tensor of stored vectors.
`TopKSAE.save` writes W_enc/b_enc/W_dec/b_dec in SAELens' tensor names and shapes (W_enc [d, m],
W_dec [m, d]) with a cfg.json, so the weights are easy to load there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nlakit.config import hint, required
from nlakit.errors import NLAError
from nlakit.extract.store import TRAINING_SPLITS, load_target
from nlakit.fileio import write_json
from nlakit.model.batching import right_pad

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 4, 16, 64)


def directions(vectors: torch.Tensor) -> torch.Tensor:
    """s·g/||g|| with s = sqrt(d): the space the SAE is trained and scored in. [n, d]"""
    v = torch.as_tensor(vectors).float()
    norm = v.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise NLAError("a vector has zero norm; its direction is undefined")
    return v / norm * math.sqrt(v.shape[-1])


class TopKSAE(nn.Module):
    """x' = W_dec^T ReLU(TopK_k(W_enc^T (x - b_dec) + b_enc)) + b_dec; W_dec rows unit norm."""

    def __init__(self, d: int, width: int, k: int, *, seed: int = 0):
        super().__init__()
        if not 1 <= k <= width:
            raise NLAError(f"k must be in 1..width ({width}), got {k}")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(width, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())  # [m, d]
        self.W_enc = nn.Parameter(w.t().clone())  # [d, m]
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.d, self.width, self.k = d, width, k

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc  # [n, m]

    def encode(self, x: torch.Tensor, k: int | None = None):
        """(values [n, k] after the ReLU, latent indices [n, k])."""
        top = self.pre_acts(x).topk(k or self.k, dim=-1)
        return F.relu(top.values), top.indices

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values,
                               mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def reconstruct(self, vectors: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Reconstructions of raw vectors [n, d] (their directions, see module doc). [n, d]"""
        x = directions(vectors)
        return torch.cat([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        from nlakit.fileio import atomic_path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "sae_weights.safetensors") as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                      str(tmp))
        cfg = {"architecture": "topk", "d_in": self.d, "d_sae": self.width, "k": self.k,
               "input": "s * g / ||g||, s = sqrt(d) (directions)", **(extra or {})}
        with atomic_path(path / "cfg.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TopKSAE:
        from safetensors.torch import load_file

        path = Path(path)
        cfg = json.loads((path / "cfg.json").read_text())
        sae = cls(cfg["d_in"], cfg["d_sae"], cfg["k"])
        sae.load_state_dict(load_file(str(path / "sae_weights.safetensors")))
        return sae


@dataclass
class SAETrainConfig:
    k: int
    width: int | None = None  # default 8 * d
    epochs: float = 8.0  # passes over the training vectors
    batch_size: int = 1024
    lr: float | None = None  # default 2e-4 / sqrt(width / 2**14) (Gao et al.), capped at 1e-3
    aux_k: int | None = None  # AuxK: latents used to model the residual, default d // 2
    aux_coef: float = 1 / 32
    dead_after: int = 100_000  # a latent is dead after this many training vectors without firing
    seed: int = 0


def train_sae(x: torch.Tensor, config: SAETrainConfig, *, progress: bool = False):
    """Train a TopK SAE on x [n, d] (already in the space it should model, e.g. `directions`).

    Loss: mean squared error + aux_coef × the AuxK loss (the top-aux_k *dead* latents modelling
    the residual, which revives them); Adam, linear decay over the last 20% of steps; decoder
    rows renormalised after every step. b_dec starts at the data mean. Deterministic for a seed.
    Returns (sae, log dict with the final training fve and dead-latent count)."""
    x = torch.as_tensor(x).float()
    n, d = x.shape
    cfg = config
    width = cfg.width or 8 * d
    lr = cfg.lr or min(1e-3, 2e-4 / math.sqrt(width / 2**14))
    aux_k = min(cfg.aux_k or d // 2, width)
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(d, width, cfg.k, seed=cfg.seed)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    steps = max(1, int(math.ceil(cfg.epochs * n / cfg.batch_size)))
    decay_from = int(0.8 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / (steps - decay_from)))
    since_fired = torch.zeros(width)
    g = torch.Generator().manual_seed(cfg.seed)
    var = float(((x - x.mean(0)) ** 2).sum(-1).mean())
    perm, at = torch.randperm(n, generator=g), 0
    t0 = time.perf_counter()
    from tqdm.auto import trange

    for _ in trange(steps, desc=f"SAE k={cfg.k}", disable=not progress):
        if at + cfg.batch_size > n:
            perm, at = torch.randperm(n, generator=g), 0
        xb = x[perm[at:at + cfg.batch_size]]
        at += cfg.batch_size
        pre = sae.pre_acts(xb)
        top = pre.topk(cfg.k, dim=-1)
        vals = F.relu(top.values)
        recon = sae.decode(vals, top.indices)
        err = xb - recon
        loss = (err ** 2).sum(-1).mean()
        with torch.no_grad():
            fired = torch.zeros(width, dtype=torch.bool)
            fired[top.indices[vals > 0]] = True
            since_fired += xb.shape[0]
            since_fired[fired] = 0
        dead = since_fired > cfg.dead_after
        if dead.any() and cfg.aux_coef > 0:
            kk = min(aux_k, int(dead.sum()))
            dpre = pre.masked_fill(~dead, float("-inf")).topk(kk, dim=-1)
            aux = F.embedding_bag(dpre.indices, sae.W_dec, per_sample_weights=F.relu(dpre.values),
                                  mode="sum")
            aux_loss = ((err.detach() - aux) ** 2).sum(-1).mean() / max(var, 1e-12)
            loss = loss + cfg.aux_coef * torch.nan_to_num(aux_loss, nan=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sae.normalize_decoder()
    sae.eval().requires_grad_(False)
    with torch.no_grad():
        recon = torch.cat([sae(x[i:i + 4096]) for i in range(0, n, 4096)])
        fve = 1 - float(((x - recon) ** 2).sum(-1).mean()) / var
    return sae, {"k": cfg.k, "width": width, "steps": steps, "lr": lr, "n_train": n,
                 "train_fve": fve, "dead_latents": int(dead.sum()),
                 "seconds": round(time.perf_counter() - t0, 2), "config": asdict(cfg)}


# ---- data -------------------------------------------------------------------------------------


def training_vectors(store, *, source: str = "tokens", splits=TRAINING_SPLITS, target=None,
                     max_vectors: int | None = None, batch_size: int = 8,
                     seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Raw block-K vectors of the store's training splits [n, d] and a description.

    source="rows": the stored rows. source="tokens": every eligible token (index >=
    min_position, not special) of the training splits' documents, recomputed with the target
    (only blocks 0..K), documents re-read from the store's corpus; `max_vectors` keeps a seeded
    random subset."""
    from nlakit.extract.store import vectors_from_arrow

    have = set(store.meta.get("counts", {}).get("rows_per_split", {})) | set(store.splits)
    splits = [s for s in splits if s in have]
    if source == "rows":
        parts = []
        for s in splits:
            for b in store.iter_batches(s, columns=["vector"]):
                parts.append(vectors_from_arrow(b.column("vector"), store.d_model))
        v = torch.from_numpy(np.concatenate(parts).copy())
        return v, {"source": "stored rows", "splits": splits, "n": len(v)}
    if source != "tokens":
        raise NLAError(f"source must be 'rows' or 'tokens', got {source!r}")
    from nlakit.eval.splice import reopen_corpus
    from nlakit.extract.extraction import tokenize_document
    from nlakit.model.arch import special_token_ids
    from nlakit.model.hooks import forward_to_layer

    model, tok = target if target is not None else load_target(store)
    cfg = store.meta.get("config", {}) or {}
    max_tokens = int(cfg.get("max_tokens_per_doc") or 1024)
    min_pos = int(cfg.get("min_position", 50))
    docs = set()
    for s in splits:
        docs |= set(store.table(s, columns=["doc_id"]).column("doc_id").to_pylist())
    special = special_token_ids(tok)
    seqs = []
    for doc in reopen_corpus(store, tok, chat_model=(model, tok)):
        if doc.doc_id in docs:
            ids = tokenize_document(tok, doc, max_tokens)
            keep = [i for i in range(min_pos, len(ids)) if ids[i] not in special]
            if keep:
                seqs.append((ids, keep))
    if not seqs:
        raise NLAError("no training document has an eligible token")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs.sort(key=lambda s: -len(s[0]))
    out = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(seqs), batch_size), desc="SAE training vectors",
                  disable=not progress):
        batch = seqs[i:i + batch_size]
        x, m = right_pad([ids for ids, _ in batch], pad)
        h = forward_to_layer(model, x.to(device), m.to(device), store.layer)
        for j, (_, keep) in enumerate(batch):
            out.append(h[j, keep].float().cpu())
    v = torch.cat(out)
    if max_vectors is not None and len(v) > max_vectors:
        idx = torch.randperm(len(v), generator=torch.Generator().manual_seed(seed))[:max_vectors]
        v = v[idx.sort().values]
    return v, {"source": f"every token at index >= {min_pos} (not special) of the training "
                         f"splits' documents, recomputed", "splits": splits,
               "documents": len(seqs), "n": len(v)}


# ---- reading an NLA against the ladder ---------------------------------------------------------


def worth_k(ladder: dict[int, float], value: float) -> dict:
    """Where `value` (an NLA's metric, higher = better) sits on a ladder {k: metric}: k found by
    linear interpolation in log2(k) between the bracketing rungs (the ladder made monotone by a
    running maximum). {"k": float or None, "relation": "below"|"within"|"above", "text"}."""
    ks = sorted(ladder)
    vals = np.maximum.accumulate([ladder[k] for k in ks])
    if value < vals[0]:
        return {"k": None, "relation": "below",
                "text": f"worth less than {ks[0]} latent{'s' if ks[0] > 1 else ''}"}
    if value > vals[-1]:
        return {"k": None, "relation": "above", "text": f"worth more than {ks[-1]} latents"}
    for (k0, v0), (k1, v1) in zip(zip(ks, vals), zip(ks[1:], vals[1:])):
        if v0 <= value <= v1:
            f = 0.0 if v1 == v0 else (value - v0) / (v1 - v0)
            k = 2 ** (math.log2(k0) + f * (math.log2(k1) - math.log2(k0)))
            return {"k": k, "relation": "within", "text": f"worth about {k:.1f} latents"}
    return {"k": float(ks[0]), "relation": "within", "text": f"worth about {ks[0]} latents"}




# ---- `nlakit sae`: the ladder on a store ------------------------------------------------------

LADDER_METRICS = ("fve_nrm", "kl", "ce_recovered")



@dataclass
class LadderConfig:
    """``nlakit sae``: which SAEs, trained how, scored on which rows."""

    ks: tuple[int, ...] = field(default=DEFAULT_KS, metadata=hint(
        "active latents k of each TopK SAE (comma-separated on the command line)"))
    width_mult: int = field(default=8, metadata=hint("SAE width as a multiple of d_model"))
    source: str = field(default="tokens", metadata=hint(
        "training vectors: tokens (every eligible token of the training splits' documents, "
        "recomputed with the target) or rows (the stored training rows only)"))
    max_vectors: int | None = field(default=None, metadata=hint(
        "keep a seeded random subset of this many training vectors"))
    epochs: float = field(default=8.0, metadata=hint("passes over the training vectors"))
    lr: float | None = field(default=None, metadata=hint(
        "Adam learning rate (None: 2e-4 / sqrt(width / 2^14), capped at 1e-3)"))
    batch_size: int = field(default=1024, metadata=hint("training vectors per step"))
    split: str = field(default="heldout", metadata=hint("the split the ladder is scored on"))
    max_rows: int | None = field(default=None, metadata=hint(
        "score about this many rows, choosing whole documents (seeded; as `nlakit eval`)"))
    reread_tokens: tuple[int, ...] = field(default=(8, 32), metadata=hint(
        "reread_N lines: the frozen target re-reading the last N tokens (as `nlakit eval`)"))
    max_new_tokens: int = field(default=150, metadata=hint(
        "explanation length cap of --nla's explanations"))
    n_boot: int = field(default=1000, metadata=hint("bootstrap resamples"))
    seed: int = field(default=0, metadata=hint("seed of training, row choice and bootstrap"))

    def __post_init__(self):
        from nlakit.config import token_counts

        self.ks = token_counts("ks", self.ks)
        self.reread_tokens = token_counts("reread_tokens", self.reread_tokens)
        if not self.ks:
            raise NLAError("sae: ks needs at least one k")
        if self.source not in ("tokens", "rows"):
            raise NLAError(f"sae: source must be tokens or rows, got {self.source!r}")
        for name in ("width_mult", "batch_size", "n_boot", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise NLAError(f"sae: {name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise NLAError(f"sae: epochs must be > 0, got {self.epochs}")


@dataclass
class LadderInputs:
    acts: str = required("activation store")
    out: str = required("output directory: ladder.json, ladder.md, ladder.png, sae_k*/ "
                        "(SAELens tensor names)")
    nla: str | None = field(default=None, metadata=hint(
        "an NLA (directory or shipped name) to explain and score on the same rows"))
    eval_json: str | None = field(default=None, metadata=hint(
        "an eval.json of the same rows whose methods are put on the ladder"))
    report: str | None = field(default=None, metadata=hint(
        "also write an HTML report with the ladder plot here (.md beside it)"))
    device: str | None = field(default=None, metadata=hint("cpu, cuda, cuda:N or auto"))
    progress: bool = field(default=True, metadata=hint("show progress bars"))


def _train_or_reuse(x: torch.Tensor, k: int, config: LadderConfig, out: Path, store,
                    progress: bool):
    """The SAE of one rung, reused from out/sae_k{k} when it was trained with the same
    settings on the same store (a rerun resumes after the last finished rung)."""
    tcfg = SAETrainConfig(k=k, width=config.width_mult * x.shape[1], epochs=config.epochs,
                          lr=config.lr, batch_size=config.batch_size, seed=config.seed)
    path = out / f"sae_k{k}"
    if (path / "cfg.json").is_file():
        saved = json.loads((path / "cfg.json").read_text())
        log_ = saved.get("train_log", {})
        if (log_.get("config") == asdict(tcfg) and saved.get("store") == str(store.path)
                and log_.get("n_train") == len(x)):
            return TopKSAE.load(path), log_
    sae, log_ = train_sae(x, tcfg, progress=progress)
    sae.save(path, extra={"layer": store.layer, "store": str(store.path), "train_log": log_})
    return sae, log_


def _eval_lines(path: str | Path, rows) -> tuple[dict, float | None]:
    """{method: {metric: mean}} of an eval.json scored on exactly `rows`, and the NLA's mean
    explanation length in tokens."""
    data = json.loads(Path(path).read_text())
    ids = sorted(int(r["row_id"]) for r in data.get("rows", []))
    if ids != sorted(int(r) for r in rows.row_ids):
        raise NLAError(f"{path} scored {len(ids)} rows of split {data.get('split')!r}, the ladder "
                       f"{len(rows)} rows of {rows.split!r}: give `nlakit sae` the eval's "
                       "--split, --max-rows and --seed so both score the same rows")
    lines = {name: {m: {"mean": s[m]["mean"], "ci": s[m]["ci"]} for m in
                    (*LADDER_METRICS, "delta_ce") if m in s}
             for name, s in data["methods"].items()}
    tokens = (data.get("explanations") or {}).get("mean_tokens")
    return lines, tokens


def _cached_training_vectors(store, target, config, out: Path, progress: bool):
    """The SAEs' training vectors (`training_vectors`), cached in OUT for reruns of the same
    store, source, cap and seed."""
    cache = out / f"train_vectors_{config.source}.pt"
    key = {"store": str(store.path), "source": config.source, "max_vectors": config.max_vectors,
           "seed": config.seed}
    blob = torch.load(cache) if cache.is_file() else None
    if blob is not None and blob.get("key") == key:
        return blob["vectors"], blob["info"]
    train, info = training_vectors(store, source=config.source, target=target,
                                   max_vectors=config.max_vectors, seed=config.seed,
                                   progress=progress)
    from nlakit.fileio import atomic_path

    with atomic_path(cache) as tmp:
        torch.save({"vectors": train, "info": info, "key": key}, tmp)
    return train, info


def _place_on_ladder(methods: dict, ks, nla_tokens):
    """(ladder {metric: {k: mean}}, lines {metric: {method: mean}} of the other methods, and
    worth {method: {metric: k}}: where each method sits on the SAE ladder)."""
    ladder = {m: {k: methods[f"sae_k{k}"][m]["mean"] for k in ks}
              for m in LADDER_METRICS if all(m in methods[f"sae_k{k}"] for k in ks)}
    others = [n for n in methods if not n.startswith("sae_k")]
    lines = {m: {n: methods[n][m]["mean"] for n in others if m in methods[n]} for m in ladder}
    worth = {}
    for n in others:  # kl: lower is better, so the ladder and the line are negated
        worth[n] = {m: worth_k({k: -v for k, v in ladder[m].items()} if m == "kl"
                               else ladder[m], -lines[m][n] if m == "kl" else lines[m][n])
                    for m in ladder if n in lines[m]}
        if n == "nla" and nla_tokens is not None:
            worth[n]["explanation_tokens"] = nla_tokens
    return ladder, lines, worth


def _nla_predictions(inputs, config, target, rows):
    """The NLA's greedy round trip of the rows ([n, d]) and its mean explanation length."""
    from nlakit.nla.facade import NLA

    nla = NLA.load(inputs.nla, device=inputs.device, target=target)
    exps = nla.explain(rows.vectors, n=1, temperature=0.0,
                       max_new_tokens=config.max_new_tokens, batch_size=16)
    pred = nla.reconstruct([e.text for e in exps], batch_size=16)
    return pred, float(np.mean([e.n_tokens for e in exps]))


def run_ladder(config: LadderConfig, inputs: LadderInputs) -> Path:
    """TopK SAEs for each k trained on the store's training splits, scored on `config.split`
    with fve_nrm, kl and ce_recovered next to baselines (mean_direction_train, reread_N) and,
    when given, an NLA and an eval.json's methods; writes OUT/ladder.json, ladder.md,
    ladder.png. Returns OUT/ladder.json."""
    from nlakit.eval.scoring import denominators, select_rows
    from nlakit.extract.store import ActivationStore

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(inputs.out)
    out.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(inputs.acts)
    target = load_target(store, device=inputs.device)
    rows = select_rows(store, config.split, config.max_rows, config.seed)
    den = denominators(store, rows)
    eval_lines, nla_tokens = ({}, None)
    if inputs.eval_json:
        eval_lines, nla_tokens = _eval_lines(inputs.eval_json, rows)

    preds, logs, info = _sae_predictions(config, inputs, store, target, rows, out, timings)
    preds.update(_baseline_predictions(config, store, target, rows, timings))
    if inputs.nla:
        t = time.perf_counter()
        preds["nla"], nla_tokens = _nla_predictions(inputs, config, target, rows)
        eval_lines.pop("nla", None)  # this NLA's own line replaces an eval.json's
        timings["nla"] = time.perf_counter() - t
    methods, spliced = _score_methods(config, inputs, store, target, rows, den, preds, timings)
    timings["total"] = time.perf_counter() - t_start
    for name, line in eval_lines.items():
        methods.setdefault(f"eval:{name}" if name in methods else name, line)
    ladder, lines, worth = _place_on_ladder(methods, config.ks, nla_tokens)
    spec = store.meta.get("model", {}).get("spec")
    result = {"kind": "nlakit_sae_ladder", "store": str(store.path), "model": spec,
              "split": rows.split, "n_rows": len(rows), "n_docs": rows.n_docs,
              "layer": store.layer, "d_model": store.d_model, "training": info,
              "config": asdict(config), "sae_logs": {str(k): v for k, v in logs.items()},
              "denominator": f"fve_nrm: rawvar = {den.rawvar:.6f} from {den.rawvar_source}",
              "ci": f"95% percentile bootstrap over documents ({config.n_boot} resamples)",
              "spliced": spliced,
              "methods": methods, "ladder": {m: {str(k): v for k, v in r.items()}
                                             for m, r in ladder.items()},
              "lines": lines, "worth": worth, "nla_mean_tokens": nla_tokens,
              "timings_s": {k: round(v, 2) for k, v in timings.items()}}
    path = out / "ladder.json"
    write_json(path, result)
    return path


def _sae_predictions(config, inputs, store, target, rows, out: Path, timings: dict):
    """({"sae_kK": reconstruction of the rows}, training logs by k, training-vector info);
    SAEs already trained with these settings under OUT are reused."""
    t = time.perf_counter()
    train, info = _cached_training_vectors(store, target, config, out, inputs.progress)
    timings["training_vectors"] = time.perf_counter() - t
    x = directions(train)
    preds, logs = {}, {}
    for k in config.ks:
        t = time.perf_counter()
        sae, logs[k] = _train_or_reuse(x, k, config, out, store, inputs.progress)
        preds[f"sae_k{k}"] = sae.reconstruct(rows.vectors)
        timings[f"sae_k{k}"] = time.perf_counter() - t
    return preds, logs, info


def _baseline_predictions(config, store, target, rows, timings: dict) -> dict:
    """The training splits' mean direction and the frozen target re-reading the last N
    tokens."""
    from nlakit.eval.baselines import reread_predictions
    from nlakit.eval.evaluate import training_mean_direction

    t = time.perf_counter()
    model, tok = target
    preds = {}
    tm = training_mean_direction(store, rows.split)
    if tm is not None:
        mu, _ = tm
        preds["mean_direction_train"] = (mu / mu.norm()).expand(len(rows), -1).clone()
    for n in config.reread_tokens:
        preds[f"reread_{n}"] = reread_predictions(model, tok, store.layer, rows.prefixes, n)
    timings["baselines"] = time.perf_counter() - t
    return preds


def _score_methods(config, inputs, store, target, rows, den, preds: dict,
                   timings: dict) -> tuple[dict, dict]:
    """Each method's fve_nrm (document-bootstrap CI) with its spliced kl, ce_recovered and
    delta_ce; and the splice's own record (its true and ablated references)."""
    from nlakit.eval import splice
    from nlakit.eval.scoring import score_reconstructions

    fve = {name: score_reconstructions(p, rows, den, n_boot=config.n_boot, seed=config.seed)[1]
           for name, p in preds.items()}
    t = time.perf_counter()
    spliced, _ = splice.spliced_eval(store, rows, preds, target=target, n_boot=config.n_boot,
                                     seed=config.seed, progress=inputs.progress)
    timings["splice"] = time.perf_counter() - t
    methods = {name: {"fve_nrm": fve[name]["fve_nrm"],
                      **{m: spliced["methods"][name][m] for m in ("kl", "ce_recovered",
                                                                  "delta_ce")
                         if m in spliced["methods"].get(name, {})}}
               for name in preds}
    record = {**{k: v for k, v in spliced.items() if k != "methods"},
              "reference": {**(spliced.get("reference") or {}),
                            **{m: spliced["methods"][m] for m in (
                                splice.TRUE_METHOD, splice.ABLATION_METHOD)
                               if m in spliced["methods"]}}}
    return methods, record






__all__ = ["DEFAULT_KS", "LadderConfig", "LadderInputs", "SAETrainConfig", "TopKSAE",
           "directions", "run_ladder", "train_sae",
           "training_vectors", "worth_k"]
