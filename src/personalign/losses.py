"""Loss functions, each pure and tested against hand-computed values. Recipes call these; no recipe
re-derives a formula."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptiveKLController",
    "RunningMeanStd",
    "bradley_terry_loss",
    "fit_bradley_terry_head",
    "gae_advantages",
    "group_advantages",
    "kl_per_token",
    "masked_mean",
    "masked_whiten",
    "pairwise_accuracy",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rebel_loss",
    "select_l2_by_cv",
    "sequence_policy_loss",
]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over pairs (the reward-model loss).

    ``logsigmoid`` keeps it finite for large margins of either sign.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(chosen.shape)} vs {tuple(rejected.shape)}")
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores strictly higher (ties count half)."""
    diff = chosen - rejected
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def fit_bradley_terry_head(diff: torch.Tensor, l2: float = 1e-2, max_iter: int = 200) -> torch.Tensor:
    """The linear reward ``r(h) = w . h`` that best fits pairs, from their feature differences
    ``diff = h_chosen - h_rejected`` (N, H): minimises ``mean(-log sigmoid(diff @ w)) + l2 |w_s|^2``
    by L-BFGS, where ``w_s`` are the weights on features standardised by their spread (so ``l2`` does
    not depend on the features' scale). Returns w (H,) on the raw features. A linear probe: the reward
    model's head fitted before fine-tuning (LP-FT, Kumar et al. 2022).
    """
    if diff.dim() != 2 or diff.shape[0] == 0:
        raise ValueError(f"diff must be (N, H) with N >= 1, got {tuple(diff.shape)}")
    x = diff.double()
    scale = x.pow(2).mean(0).sqrt().clamp_min(1e-8)  # (H,) root mean square (differences are centred)
    xs = x / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -F.logsigmoid(xs @ w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / scale).to(diff.dtype)


def select_l2_by_cv(diff: torch.Tensor, groups: list[str], grid: list[float], folds: int = 5,
                    seed: int = 0) -> tuple[float, dict[float, float]]:
    """The ``l2`` of :func:`fit_bradley_terry_head` with the best k-fold cross-validated pairwise accuracy.

    ``groups`` names each pair's instruction; every instruction's pairs fall in one fold, so a fold
    never scores pairs whose instruction it trained on (as the held-out split). Folds are the
    instructions in a seeded shuffle, dealt round-robin. Returns the chosen ``l2`` (the largest among
    equal accuracies: the simpler model) and the mean accuracy for each candidate.
    """
    import random

    if len(groups) != diff.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries for {diff.shape[0]} pairs")
    if not grid:
        raise ValueError("grid of l2 values is empty")
    names = sorted(set(groups))
    if len(names) < folds:
        raise ValueError(f"{len(names)} instructions cannot be split into {folds} folds")
    random.Random(seed).shuffle(names)
    fold_of = {g: i % folds for i, g in enumerate(names)}
    fold = torch.tensor([fold_of[g] for g in groups])
    scores: dict[float, float] = {}
    for l2 in grid:
        accs = []
        for k in range(folds):
            test = fold == k
            w = fit_bradley_terry_head(diff[~test], l2)
            margin = diff[test] @ w
            accs.append(pairwise_accuracy(margin, torch.zeros_like(margin)))
        scores[float(l2)] = sum(accs) / folds
    best = max(scores.values())
    return max(l2 for l2, acc in scores.items() if acc >= best - 1e-12), scores


# -- reinforcement learning -------------------------------------------------------------------------
# Shapes: B sequences, T response tokens; ``mask`` (B, T) is 1 on real response tokens (up to and
# including end-of-sequence) and 0 on padding. Every reduction over tokens uses the mask.


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1. With ``all_sum`` (sum a tensor over the
    processes of a data-parallel run; ``dim`` None only) the mean is over every process's entries."""
    mask = mask.to(x.dtype)
    if dim is None:
        if all_sum is not None:
            total, count = all_sum(torch.stack([(x * mask).sum(), mask.sum()]))
            return total / count.clamp(min=1)
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries (every process's, with
    ``all_sum``: see :func:`masked_mean`)."""
    mean = masked_mean(x, mask, all_sum=all_sum)
    var = masked_mean((x - mean) ** 2, mask, all_sum=all_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probabilities of the sampled tokens.

    ``k1`` = logp - ref_logp (unbiased, can be negative; the paper's PPO penalty), ``k3`` =
    exp(ref - logp) - (ref - logp) - 1 (unbiased and non-negative, Schulman's estimator).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each sequence's masked tokens.

    ``rewards`` and ``values`` are (B, T); returns (advantages, returns), zero on padding.
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last real token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}.
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        next_v = values[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        last = (delta + gamma * lam * last) * mask[:, i]
        adv[:, i] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = exp(logp - old)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    return loss, {"clipfrac": float(clipfrac), "ratio": float(masked_mean(ratio.detach(), mask))}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean max((V - R)^2, (clip(V, V_old +- e) - R)^2)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def group_advantages(rewards: torch.Tensor, group_size: int, method: str = "rloo",
                     scale: bool = False) -> torch.Tensor:
    """Critic-free advantages for ``rewards`` (N,) laid out as consecutive groups of one prompt.

    ``rloo``: each sample's reward minus the mean of the *other* samples of its group;
    ``grpo``: reward minus the group mean, divided by the group standard deviation (+1e-4).
    ``scale`` divides rloo advantages by the group standard deviation too.
    """
    if group_size < 2:
        raise ValueError("group-relative advantages need at least 2 samples per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)
    if method == "rloo":
        adv = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
        if scale:
            adv = adv / (g.std(1, keepdim=True) + 1e-4)
    elif method == "grpo":
        adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    else:
        raise ValueError(f"unknown method {method!r}; use rloo or grpo")
    return adv.reshape(-1)


def sequence_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic-free policy loss: one advantage per sequence (B,), broadcast to its tokens, clipped
    ratio as in PPO (with one update epoch and ``old_logp == logp.detach()`` it is the plain
    policy gradient ``-A * logp``)."""
    return ppo_policy_loss(logp, old_logp, advantages[:, None].expand_as(logp), mask, clip)


class RunningMeanStd:
    """Running mean and variance (parallel Welford), for normalising rewards across batches."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = float(x.mean()), float(x.var(unbiased=False))
        delta = b_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var**0.5 + 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), float(d["count"])


class AdaptiveKLController:
    """Ziegler et al.'s adaptive KL coefficient: move beta so the observed KL tracks ``target``.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).
    """

    def __init__(self, init: float = 0.2, target: float = 6.0, horizon: int = 10000):
        self.value = init
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> float:
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + err * n_steps / self.horizon
        return self.value


def rebel_loss(logp_y: torch.Tensor, logp_old_y: torch.Tensor, logp_yp: torch.Tensor, logp_old_yp: torch.Tensor,
               u_y: torch.Tensor, u_yp: torch.Tensor, eta: float) -> torch.Tensor:
    """REBEL (Gao et al. 2024): regress the relative log-ratio of two responses onto their utility gap.

    Inputs are per-sequence values (B,): log-probs summed over response tokens under the current and the
    sampling policy, and utilities. With D(y) = logp(y) - logp_old(y) the loss is
    mean(((D(y) - D(y')) / eta - (U(y) - U(y')))^2).
    """
    from personalign.errors import ConfigError

    if not eta > 0:
        raise ConfigError(f"REBEL eta must be positive, got {eta}; a typical value is 1.0")
    tensors = {"logp_y": logp_y, "logp_old_y": logp_old_y, "logp_yp": logp_yp, "logp_old_yp": logp_old_yp,
               "u_y": u_y, "u_yp": u_yp}
    for name, x in tensors.items():
        if x.dim() != 1 or x.shape != logp_y.shape:
            raise ValueError(f"REBEL input {name} has shape {tuple(x.shape)}; every input must be (B,) = "
                             f"{tuple(logp_y.shape)}, one value per sequence")
    d = (logp_y - logp_old_y) - (logp_yp - logp_old_yp)  # (B,)
    return ((d / eta - (u_y - u_yp)) ** 2).mean()
