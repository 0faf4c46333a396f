"""Rewards, advantages and the clipped policy loss of the RL stage (pure tensor functions).

Shapes: rewards and advantages are [n] with n = m * G (activation-major: activation 0's G samples
first, as `Verbalizer.generate(n=G)` returns them); per-token tensors are [n, T] with a 0/1
response mask (right padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlakit import metrics
from nlakit.errors import NLAError

REWARDS = ("negmse", "neglog", "contrastive")
KL_ESTIMATORS = ("k1", "k3")
FAILURE_REWARD = -2.0


def negmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−mse_nrm per row, in [−4, 0] (0 = perfect direction). [n]"""
    return -metrics.mse_nrm(pred, target)


def neglog(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """−log(mse_nrm + eps) per row: sharper near a perfect reconstruction. [n]"""
    return -torch.log(metrics.mse_nrm(pred, target) + eps)


def contrastive(pred: torch.Tensor, target: torch.Tensor, owner: torch.Tensor,
                temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE reward: log-probability that a reconstruction picks its own activation among the
    batch's distinct activations, with logits cos(pred_i, act_j) / temperature. [n], <= 0.

    pred: [n, d] reconstructions; target: [m, d] the distinct activations of the batch;
    owner: [n] index into `target` of each row's own activation. A reconstruction is paid for
    being closer (in cosine) to its own activation than to the others in the batch, so what
    every activation shares (the mean direction) earns nothing.
    """
    if target.shape[0] < 2:
        raise NLAError("the contrastive reward needs at least 2 activations per batch (per "
                       "process); raise --batch-size")
    if temperature <= 0:
        raise NLAError(f"contrastive temperature must be positive, got {temperature}")
    logits = metrics.unit(pred) @ metrics.unit(target).T / temperature  # [n, m]
    return -F.cross_entropy(logits, owner.to(logits.device).long(), reduction="none")


def compute_rewards(kind: str, pred: torch.Tensor, vectors: torch.Tensor, group_size: int,
                    contrastive_temperature: float = 0.1) -> torch.Tensor:
    """Raw reward of each of the m*G samples. pred: [m*G, d]; vectors: [m, d] activations."""
    if kind not in REWARDS:
        raise NLAError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}")
    if pred.shape[0] != vectors.shape[0] * group_size:
        raise NLAError(f"{pred.shape[0]} reconstructions for {vectors.shape[0]} activations x "
                       f"group size {group_size}")
    owner = torch.arange(vectors.shape[0]).repeat_interleave(group_size)
    if kind == "contrastive":
        return contrastive(pred, vectors, owner, contrastive_temperature)
    target = vectors[owner]
    return negmse(pred, target) if kind == "negmse" else neglog(pred, target)


def apply_failures(rewards: torch.Tensor, failed: torch.Tensor,
                   penalty: float | None = FAILURE_REWARD) -> torch.Tensor:
    """Replace the reward of failed samples (no closing tag, or stopped by the length cap) with
    `penalty` (−2 by default: below any −mse_nrm, so the cap never pays for verbosity).
    penalty=None leaves rewards unchanged."""
    if penalty is None:
        return rewards
    return torch.where(failed.to(rewards.device).bool(),
                       torch.full_like(rewards, float(penalty)), rewards)


def length_penalty(rewards: torch.Tensor, n_tokens: torch.Tensor, cap: int,
                   coef: float) -> torch.Tensor:
    """rewards − coef · n_tokens / cap: coef is the reward lost by a response of full length."""
    if coef == 0:
        return rewards
    return rewards - coef * n_tokens.to(rewards).float() / float(cap)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r − mean_group) / (std_group + eps), groups of `group_size` consecutive samples.
    std is the sample standard deviation (n − 1); a group with equal rewards gets 0."""
    if group_size < 2:
        raise NLAError(f"group-normalised advantages need a group size >= 2, got {group_size}")
    if rewards.numel() % group_size:
        raise NLAError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1"):
    """Per-token estimate of KL(π || π_ref) on sampled tokens.
    k1 = log π − log π_ref (unbiased, can be negative); k3 = exp(−x) + x − 1 with
    x = log π − log π_ref (unbiased, >= 0, lower variance)."""
    if estimator not in KL_ESTIMATORS:
        raise NLAError(f"unknown KL estimator {estimator!r}; choose k1 or k3")
    x = logp - ref_logp
    return x if estimator == "k1" else torch.exp(-x) + x - 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate: per token −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = π/π_old, averaged
    over each response's tokens, then over responses. Returns (loss, {clip_fraction, ratio})."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        clip_frac = masked_mean((clipped < unclipped).float(), mask)
        mean_ratio = masked_mean(ratio, mask)
    return loss, {"clip_fraction": float(clip_frac), "ratio_mean": float(mean_ratio)}


def truncate_lengths(n_groups: int, group_size: int, max_tokens: int, min_tokens: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Matryoshka prefix lengths: one uniform length in [min_tokens, max_tokens] per group,
    repeated for its G samples. [n_groups * G]"""
    lo = max(1, min(min_tokens, max_tokens))
    lengths = torch.randint(lo, max_tokens + 1, (n_groups,), generator=generator)
    return lengths.repeat_interleave(group_size)
