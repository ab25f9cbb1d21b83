"""Where guidance acts: on the denoiser's output, or on its ε-equivalent (see docs/guidance.md, "Prediction space").

SLD and SEGA were defined, and their hyper-parameters tuned, on ε-predictions. Everything they
compute is a difference of two estimates at the same x_t (ε_p − ε_S, ε_S − ε_∅, ε_e − ε_∅), and for
the prediction types diffusers uses the ε-equivalent of such a difference is the model's own
difference times a per-sample factor c that depends only on the noise level:

* ε-prediction: c = 1;
* v-prediction (v = α ε − σ x₀): c = α = √ᾱ_t;
* flow-matching velocity (x_t = (1 − σ) x₀ + σ ε, v = ε − x₀): c = 1 − σ.

Acting "in ε space" therefore means: scale every estimate by c, let the term compute Δ_ε, and add
Δ_ε / c to the model's estimate. Where c = 0 (σ = 1, pure noise) every ε-equivalent estimate is the
same, so the term contributes nothing there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def apply_in_epsilon(
    apply: Callable, c: torch.Tensor | None, eps_uncond, eps_text, eps_concepts: Sequence[torch.Tensor | None]
):
    """``apply(u, t, concepts) -> (Δ, state)`` run on ε-equivalents (estimates × c per sample); returns
    (Δ in the model's own space, state). ``c=None`` means c = 1: the estimates pass unchanged."""
    if c is None:
        return apply(eps_uncond, eps_text, eps_concepts)
    c = c.to(device=eps_uncond.device, dtype=eps_uncond.dtype).reshape(-1, *([1] * (eps_uncond.ndim - 1)))
    scaled = [None if e is None else c * e for e in eps_concepts]
    delta, state = apply(c * eps_uncond, c * eps_text, scaled)
    positive = c > 0
    delta = torch.where(positive, delta / torch.where(positive, c, torch.ones_like(c)), torch.zeros_like(delta))
    return delta, state


def epsilon_factor(
    prediction: str, timestep, *, alphas_cumprod: torch.Tensor | None = None, timestep_scale: float = 1000.0
) -> torch.Tensor | None:
    """The factor c at `timestep` (a number or one per sample, the scheduler's units; on the CPU, float64 for
    flow) for a model predicting `prediction`: None (c = 1) for ε; √ᾱ_t for v-prediction (v = α ε − σ x₀ and
    x_t = α x₀ + σ ε give ε = α v + σ x_t); 1 − σ with σ = t / `timestep_scale` for flow matching
    (x_t = (1 − σ) x₀ + σ ε and v = ε − x₀ give ε = x_t + (1 − σ) v)."""
    if prediction == "epsilon":
        return None
    t = torch.as_tensor(timestep).detach()
    if prediction == "v_prediction" and alphas_cumprod is not None:
        index = t.flatten().float().round().long().cpu().clamp(0, len(alphas_cumprod) - 1)
        return alphas_cumprod[index].sqrt()
    if prediction == "flow":
        return 1.0 - t.to("cpu", torch.float64).flatten() / timestep_scale
    raise ValueError(f"space='epsilon' is not defined for a model predicting {prediction!r}; use space='model'")
