"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025): FedAvg with a server-side correction of B.

Clients train A and B from the server's, as in FedAvg, and base weights never
change. The server averages, A_bar = sum p_k A_k and B_bar = sum p_k B_k, and
corrects B so that (B_bar + dB) A_bar comes close to the ideal dW* = sum p_k B_k A_k:

- ``objective=cosine`` (the paper's): dB = argmin S(dW*, (B_bar + dB) A_bar) + lam ||dB||_F,
  with S = 1 - cos(vec dW*, vec((B_bar + dB) A_bar)), solved from dB = 0 by proximal
  gradient steps with a backtracking line search. The prox of lam ||.||_F shrinks dB
  towards 0 and sets it to exactly 0 once lam >= ||grad S(0)||, so lam -> infinity
  gives FedAvg. (The paper says "gradient descent" and gives no solver; a proximal
  step handles the non-smooth norm at 0 and needs no learning rate.)
- ``objective=l2``: dB = argmin ||dW* - (B_bar + dB) A_bar||_F^2 + lam ||dB||_F^2, in
  closed form dB = (dW* - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1.

Everything is computed on small factors: with B* = [B_1 | ... | B_K] and
A* = [p_1 A_1; ...; p_K A_K] (so dW* = B* A*), inner products and norms of
d_out x d_in products reduce to traces of (K r x r) and (r x r) matrices; no
d_out x d_in matrix is formed. The broadcast is (A_bar, B_bar + dB), the next
round's start (the paper's "initialization refinement").

Each round ``report`` holds, summed over layers (norms of all layers' matrices taken
together), the relative residual ||dW* - (B_bar + dB) A_bar|| / ||dW*|| and FedAvg's
||dW* - B_bar A_bar|| / ||dW*||, and the two cosine similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.lora import Role, Tensors
from strategies.base import Combine, Strategy, StrategyConfig, average_payloads, partner, stack, weighted_mean

OBJECTIVES = ("cosine", "l2")


@dataclass(frozen=True)
class LoraFairConfig(StrategyConfig):
    """``objective`` (cosine | l2), penalty weight ``lam`` on dB, at most ``steps`` proximal steps (cosine)."""

    objective: str = "cosine"
    lam: float = 0.01
    steps: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"strategy.objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.lam < 0:
            raise ValueError(f"strategy.lam must be >= 0, got {self.lam}")
        if self.steps < 1:
            raise ValueError(f"strategy.steps must be >= 1, got {self.steps}")


class Factors:
    """dW* = B* A* and the candidate M A_bar, with their inner products from small Gram matrices."""

    def __init__(self, b_star: torch.Tensor, a_star: torch.Tensor, a_bar: torch.Tensor) -> None:
        self.b_star = b_star
        self.cross = a_star @ a_bar.T  # (K r, r)
        self.gram = a_bar @ a_bar.T  # (r, r)
        self.norm2_star = ((b_star.T @ b_star) * (a_star @ a_star.T)).sum()

    def inner(self, m: torch.Tensor) -> torch.Tensor:
        """<dW*, M A_bar> = tr(A*^T B*^T M A_bar)."""
        return ((self.b_star.T @ m) * self.cross).sum()

    def norm2(self, m: torch.Tensor) -> torch.Tensor:
        """||M A_bar||_F^2."""
        return ((m.T @ m) * self.gram).sum()

    def dissimilarity(self, m: torch.Tensor) -> torch.Tensor:
        return 1 - self.inner(m) / (self.norm2_star.sqrt() * self.norm2(m).sqrt())


def l2_correction(f: Factors, b_bar: torch.Tensor, lam: float) -> torch.Tensor:
    """(dW* - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1, from the small factors."""
    rhs = f.b_star @ f.cross - b_bar @ f.gram  # (dW* - B_bar A_bar) A_bar^T, (d_out, r)
    lhs = f.gram + lam * torch.eye(len(f.gram), dtype=f.gram.dtype)
    return torch.linalg.lstsq(lhs, rhs.T).solution.T  # lhs is symmetric: X lhs = rhs


def cosine_correction(f: Factors, b_bar: torch.Tensor, lam: float, steps: int) -> torch.Tensor:
    """Proximal gradient with backtracking on S(dW*, (B_bar + dB) A_bar) + lam ||dB||_F, from dB = 0."""
    x = torch.zeros_like(b_bar)
    if f.norm2_star <= 0 or f.norm2(b_bar) <= 0:
        return x  # a zero update on either side: the cosine is undefined, leave FedAvg's B

    def value_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        value = f.dissimilarity(b_bar + x)
        (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    def prox(v: torch.Tensor, t: float) -> torch.Tensor:
        norm = v.norm()
        return v * torch.clamp(1 - t * lam / norm, min=0) if norm > 0 else v

    t = float(b_bar.norm()) ** 2  # the gradient scales as 1 / ||B_bar||: this step moves dB by about ||B_bar||
    for _ in range(steps):
        value, grad = value_and_grad(x)
        while True:
            z = prox(x - t * grad, t)
            d = z - x
            if f.dissimilarity(b_bar + z) <= value + (grad * d).sum() + (d * d).sum() / (2 * t) or t < 1e-30:
                break
            t /= 2
        x = z
        if d.norm() <= 1e-10 * b_bar.norm():
            break
        t *= 2  # let the step grow back after backtracking
    return x


class LoraFair(Strategy):
    """FedAvg on A and B, then B corrected towards the ideal update."""

    name = "lora_fair"
    config_class = LoraFairConfig
    metric_columns = ("residual", "residual_fedavg", "cosine", "cosine_fedavg")
    user_level_dp = False
    secure_aggregation = False
    secure_note = "lora_fair's correction reads every client's product B_k A_k, which the sum does not show"
    user_dp_note = (
        "lora_fair's correction reads every client's B_k A_k; after the noisy mean it has nothing to correct "
        "towards, and a correction from the raw products would release them unprotected"
    )

    def aggregate(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> Tensors:
        return self.aggregate_report(state, payloads, p, server_round=server_round, combine=combine)[0]

    def aggregate_report(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> tuple[Tensors, dict[str, float]]:
        """FedAvg's mean with B corrected, and how far each is from the ideal update (``metric_columns``)."""
        new = average_payloads(state, payloads, p, combine)
        stacked = stack(payloads, p)
        sums = dict.fromkeys(("star", "fair", "fedavg", "inner_fair", "inner_fedavg", "norm_fair", "norm_fedavg"), 0.0)
        for b_key in sorted(k for k in stacked if k.role is Role.B):
            a_key = partner(b_key, Role.A)
            b_bar, a_bar = new[b_key].double(), new[a_key].double()
            f = Factors(stacked[b_key].double(), stacked[a_key].double(), a_bar)
            if self.config.objective == "l2":
                db = l2_correction(f, b_bar, self.config.lam)
            else:
                db = cosine_correction(f, b_bar, self.config.lam, self.config.steps)
            corrected = b_bar + db
            new[b_key] = corrected.to(new[b_key].dtype)
            sums["star"] += float(f.norm2_star)
            for name, m in (("fair", corrected), ("fedavg", b_bar)):
                inner, norm2 = float(f.inner(m)), float(f.norm2(m))
                sums[f"inner_{name}"] += inner
                sums[f"norm_{name}"] += norm2
                sums[name] += max(float(f.norm2_star) - 2 * inner + norm2, 0.0)
        star = max(sums["star"], 1e-300)
        report = {
            "residual": (sums["fair"] / star) ** 0.5,
            "residual_fedavg": (sums["fedavg"] / star) ** 0.5,
            "cosine": sums["inner_fair"] / max((star * sums["norm_fair"]) ** 0.5, 1e-300),
            "cosine_fedavg": sums["inner_fedavg"] / max((star * sums["norm_fedavg"]) ** 0.5, 1e-300),
        }
        return new, report
