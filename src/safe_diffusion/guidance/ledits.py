"""LEDITS++ (Brack et al., CVPR 2024), as pure functions over tensors.

Three parts, in the paper's order:

* **Inversion** (§3.1). An image's latent x_0 is inverted with the second-order multistep
  SDE-DPM-Solver++ (Lu et al., 2022) in the edit-friendly way of Huberman-Spiegelglas et al.
  (CVPR 2024): an auxiliary sequence x_t = α_t x_0 + σ_t ε_t is drawn with *independent* noise per
  step, and each step's noise map z_t = (x_{t-1} − μ_t(x_t)) / s_t is the one that makes the
  solver's step from x_t land exactly on x_{t-1}. Denoising from x_T with those z_t reconstructs
  x_0 exactly, in as few steps as the solver needs.
* **Edit guidance** (§3.2). Several concepts at once, in SEGA's vocabulary (reverse direction,
  scale s_e, threshold λ, warm-up, cool-down): ε̂ = ε_∅ + Σ_i M_i · ψ_i with
  ψ_i = ±s_{e,i} (ε_{e_i} − ε_∅).
* **Implicit masking** (§3.3, eq. 12). M¹_i, the cross-attention mask: the concept's attention
  map, smoothed, kept above its λ-quantile. M²_i, the noise-estimate mask: Σ_channels |ψ_i| kept
  above its λ-quantile. M_i = M¹_i ∩ M²_i.

Time is the noise level σ of k-diffusion (σ_t = √((1 − ᾱ_t)/ᾱ_t)); latents are those the UNet
takes (variance preserving), so α_t = 1/√(1 + σ²) and σ_vp = σ·α_t. Every function works on any
latent layout (batch, channels, *spatial): images, video, 3-D. Nothing here knows about
pipelines, schedulers, tokenizers or devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .sega import needs_edit_estimate
from .sld import DEFAULT_SAFETY_CONCEPT
from .terms import Concept, _per_concept

Masking = Literal["intersect", "cross_attention", "noise"]
MASKINGS = ("intersect", "cross_attention", "noise")

#: The SLD safety concept (Schramowski et al., CVPR 2023) split into its parts: what `sanitize`
#: removes by default, one LEDITS++ edit (and one implicit mask) per part.
SAFETY_CONCEPTS: tuple[str, ...] = tuple(
    part.strip() for part in DEFAULT_SAFETY_CONCEPT.removeprefix("an image showing ").split(",")
)


# -- noise schedule --------------------------------------------------------------------------------


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for every training timestep t (k-diffusion's noise levels)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def leading_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int = 0) -> list[int]:
    """The `num_steps` timesteps, descending, of DPM-Solver's "leading" spacing (what LEDITS++ inverts over).

    The spacing is ⌊T / (n + 1)⌋ and the grid starts at 0, so the smallest timestep is one spacing
    (plus `steps_offset`) above 0, as in diffusers' ``DPMSolverMultistepScheduler``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    ratio = num_train_timesteps // (num_steps + 1)
    if ratio < 1:
        raise ValueError(f"{num_steps} steps do not fit into {num_train_timesteps} training timesteps")
    return [k * ratio + steps_offset for k in range(num_steps, 0, -1)]


def inversion_timesteps(
    num_train_timesteps: int, num_inversion_steps: int, skip: float, steps_offset: int = 0
) -> list[int]:
    """The timesteps LEDITS++ inverts over: the last `num_inversion_steps` of ⌊n·(1 + skip)⌋ leading steps.

    `skip` drops the noisiest fraction of the schedule: the edit starts from a partly noised image,
    so lower values allow larger changes.
    """
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    total = int(num_inversion_steps * (1 + skip))
    return leading_timesteps(num_train_timesteps, total, steps_offset)[-num_inversion_steps:]


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of the variance-preserving process at noise level σ: α = 1/√(1 + σ²), σ_vp = σ·α."""
    alpha = 1.0 / torch.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x_0 + σ_t ε of the auxiliary sequence (§3.1; edit-friendly: one independent ε per step)."""
    alpha, sigma_vp = vp_coefficients(sigma)
    return alpha * x0 + sigma_vp * noise


def denoised(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The data prediction x̂_0 that DPM-Solver++ integrates, from an ε-, v- or x_0-predicting model."""
    alpha, sigma_vp = vp_coefficients(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_vp * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma_vp * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon, v_prediction or sample)")


def sde_dpmpp_mean(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    x0_pred_prev: torch.Tensor | None = None,
    sigma_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """The deterministic part μ of one SDE-DPM-Solver++ step from σ to σ_next (§3.1).

    With h = λ_next − λ (λ = log α − log σ_vp, the half log-SNR):
    μ = (σ_next/σ)·e^{−h}·x + α_next (1 − e^{−2h}) D, where D = x̂_0 (first order) or, given the
    previous step's x̂_0, the multistep midpoint estimate D = x̂_0 + (x̂_0 − x̂_0,prev)/(2r) with
    r = h_prev / h (second order, "2M"). σ_next = 0 is a deterministic last step: μ = x̂_0.
    """
    if float(sigma_next) == 0.0:
        return x0_pred
    alpha, sigma_vp = vp_coefficients(sigma)
    alpha_next, sigma_vp_next = vp_coefficients(sigma_next)
    lam = torch.log(alpha) - torch.log(sigma_vp)
    h = torch.log(alpha_next) - torch.log(sigma_vp_next) - lam
    d = x0_pred
    if x0_pred_prev is not None:
        alpha_prev, sigma_vp_prev = vp_coefficients(sigma_prev)
        r = (lam - (torch.log(alpha_prev) - torch.log(sigma_vp_prev))) / h
        d = x0_pred + 0.5 * (1.0 / r) * (x0_pred - x0_pred_prev)
    return (sigma_vp_next / sigma_vp * torch.exp(-h)) * x + (alpha_next * (1 - torch.exp(-2.0 * h))) * d


def sde_dpmpp_noise_scale(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """s, the scale of the step's noise: σ_vp,next · √(1 − e^{−2h}) (0 for a last step to σ = 0)."""
    if float(sigma_next) == 0.0:
        return torch.zeros_like(sigma)
    alpha, sigma_vp = vp_coefficients(sigma)
    alpha_next, sigma_vp_next = vp_coefficients(sigma_next)
    h = (torch.log(alpha_next) - torch.log(sigma_vp_next)) - (torch.log(alpha) - torch.log(sigma_vp))
    return sigma_vp_next * torch.sqrt(1.0 - torch.exp(-2.0 * h))


def noise_map(x_next: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z = (x_{t−1} − μ) / s: the noise that makes the step land on x_{t−1} (§3.1); zeros where s = 0."""
    if float(scale) == 0.0:
        return torch.zeros_like(x_next)
    return (x_next - mean) / scale


def sde_dpmpp_step(mean: torch.Tensor, scale: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_{t−1} = μ + s·z: one stochastic solver step with a given (recorded) noise map."""
    return mean + scale * z


# -- edit guidance and implicit masks -------------------------------------------------------------


def edit_direction(
    eps_uncond: torch.Tensor, eps_edit: torch.Tensor, *, scale: float, sign: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """ψ_i = ±s_{e,i}·(ε_{e_i} − ε_∅): SEGA's semantic direction (NeurIPS 2023, eq. 4) before masking (§3.2)."""
    if isinstance(sign, torch.Tensor):  # per image: shape (batch,)
        sign = sign.to(device=eps_edit.device, dtype=eps_edit.dtype).reshape(-1, *([1] * (eps_edit.ndim - 1)))
    return (eps_edit - eps_uncond) * sign * scale


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each row of a (rows, n) tensor, computed in float32 whatever the input's precision.

    float32, as LEDITS++'s code and SEGA here compute it: the percentile masks compare every element
    with this value, and on nearly flat maps (attention summed over 75 tokens is ≈ 0.97 everywhere)
    elements lie within float32 rounding of it, so another precision would flip them.
    """
    return torch.quantile(values.float(), q, dim=1).to(values.dtype)


def noise_mask(psi: torch.Tensor, threshold: float) -> torch.Tensor:
    """M², the noise-estimate mask of eq. (12): 1 where Σ_channels |ψ| reaches its λ-quantile over the sample.

    Returns shape (batch, 1, *spatial), broadcasting over channels.
    """
    magnitude = psi.abs().sum(dim=1, keepdim=True)
    q = _quantile(magnitude.flatten(start_dim=1), threshold)
    q = q.reshape(-1, *([1] * (magnitude.ndim - 1)))
    return (magnitude >= q).to(psi.dtype)


def smoothing_weights(size: int = 3, sigma: float = 0.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """The 1-D smoothing kernel LEDITS++ applies along each spatial axis of an attention map (§3.3).

    Weights ∝ exp(−((d − m) / (2σ))²), normalised to sum to 1: the kernel LEDITS++'s code takes
    from Attend-and-Excite (Chefer et al., 2023). That is a Gaussian of standard deviation √2·σ,
    not σ; kept as is, because it is the kernel the paper's masks were made with.
    """
    d = torch.arange(size, dtype=torch.float64)
    w = torch.exp(-(((d - (size - 1) / 2) / (2 * sigma)) ** 2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Separable smoothing of (batch, *spatial) maps with :func:`smoothing_weights`, edges reflected."""
    weights = smoothing_weights(size, sigma, dtype=maps.dtype, device=maps.device).reshape(1, 1, size)
    out = maps
    for axis in range(1, maps.ndim):
        moved = out.movedim(axis, -1)
        shape = moved.shape
        rows = moved.reshape(-1, 1, shape[-1])
        rows = F.pad(rows, (size // 2, size // 2), mode="reflect")
        out = F.conv1d(rows, weights).reshape(shape).movedim(-1, axis)
    return out


def cross_attention_mask(
    attention: torch.Tensor, threshold: float, latent_shape: Sequence[int]
) -> torch.Tensor:
    """M¹, the cross-attention mask of eq. (12), at the latents' spatial size.

    `attention`: (batch, *spatial) — the concept tokens' cross-attention, averaged over heads and
    layers and summed over the tokens. It is smoothed, kept where it reaches its λ-quantile, and
    brought to `latent_shape` (the latents' spatial size) by nearest-neighbour upsampling.
    Returns shape (batch, 1, *latent_shape).
    """
    smoothed = smooth(attention)
    q = _quantile(smoothed.flatten(start_dim=1), threshold)
    mask = (smoothed >= q.reshape(-1, *([1] * (smoothed.ndim - 1)))).to(attention.dtype)
    return F.interpolate(mask.unsqueeze(1), size=tuple(latent_shape), mode="nearest")


def concept_is_active(step: int, warmup_steps: int, cooldown_steps: int | None) -> bool:
    """Whether concept i guides at `step`: past its warm-up and before its cool-down (no momentum in LEDITS++)."""
    return needs_edit_estimate(step, warmup_steps=warmup_steps, cooldown_steps=cooldown_steps, momentum_scale=0.0)


def ledits_guidance(
    eps_uncond: torch.Tensor,
    eps_edits: Sequence[torch.Tensor],
    step: int,
    timestep: int,
    *,
    scales: Sequence[float],
    thresholds: Sequence[float],
    signs: Sequence[float | torch.Tensor],
    warmup_steps: Sequence[int],
    cooldown_steps: Sequence[int | None],
    masking: Masking = "intersect",
    attention: Sequence[torch.Tensor | None] | None = None,
    intersect_from_timestep: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The edit guidance γ = Σ_i M_i·ψ_i at `step` (§3.2–3.3, eq. 12), and each concept's mask M_i.

    `masking`: "intersect" (M¹ ∩ M², the paper's), "cross_attention" (M¹ only) or "noise" (M² only).
    `attention`: per concept, its cross-attention map for :func:`cross_attention_mask` (needed
    unless masking is "noise"). With `intersect_from_timestep`, steps at larger timesteps (the
    noisiest, where ε is least structured) use M¹ alone, as LEDITS++'s SD code does above t = 800.
    A concept's mask is None where it does not guide (warm-up, cool-down). The guided estimate is
    ε_∅ + γ.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    gamma = torch.zeros_like(eps_uncond)
    masks: list[torch.Tensor | None] = []
    spatial = eps_uncond.shape[2:]
    for i, eps_edit in enumerate(eps_edits):
        if not concept_is_active(step, warmup_steps[i], cooldown_steps[i]):
            masks.append(None)
            continue
        psi = edit_direction(eps_uncond, eps_edit, scale=scales[i], sign=signs[i])
        if masking == "noise":
            mask = noise_mask(psi, thresholds[i])
        else:
            if attention is None or attention[i] is None:
                raise ValueError(f"masking {masking!r} needs the cross-attention map of concept {i}")
            mask = cross_attention_mask(attention[i], thresholds[i], spatial).to(psi.dtype)
            late = intersect_from_timestep is not None and timestep > intersect_from_timestep
            if masking == "intersect" and not late:
                mask = noise_mask(psi, thresholds[i]) * mask
        gamma = gamma + psi * mask
        masks.append(mask)
    return gamma, masks


# -- the hyper-parameters, bound together ---------------------------------------------------------


@dataclass(frozen=True)
class LEditsGuidance:
    """LEDITS++ edits: several concepts at once, each added or removed inside its implicit mask.

    Every per-concept setting is one value or a list with one entry per concept, as in
    :class:`~safe_diffusion.guidance.SemanticGuidance`; `reverse` removes a concept instead of
    adding it. Defaults are those of diffusers' LEDITS++ pipelines (scale 5, threshold 0.9, no
    warm-up, masks M¹ ∩ M²).

    `attention_tokens`: which token positions make a concept's cross-attention map. "all" sums
    every position after the start token (the concept's tokens, the end token and the padding), as
    LEDITS++'s code and diffusers do — their token count is the padded length; "concept" sums only
    the concept's own tokens, as the paper's text describes.
    `intersect_from_timestep`: see :func:`ledits_guidance`; "auto" is 800 on Stable Diffusion 1.x/2.x
    and None (every step) on SDXL, as in diffusers' two LEDITS++ pipelines.
    """

    concepts: Sequence[Concept] = ()
    reverse: bool | Sequence[bool] = False
    scale: float | Sequence[float] = 5.0
    threshold: float | Sequence[float] = 0.9
    warmup_steps: int | Sequence[int] = 0
    cooldown_steps: int | None | Sequence[int | None] = None
    masking: Masking = "intersect"
    attention_tokens: Literal["all", "concept"] = "all"
    intersect_from_timestep: int | None | Literal["auto"] = "auto"

    def __post_init__(self):
        concepts = [self.concepts] if isinstance(self.concepts, (str, torch.Tensor)) else list(self.concepts)
        if not concepts:
            raise ValueError("LEditsGuidance needs at least one edit concept")
        object.__setattr__(self, "concepts", concepts)
        n = len(concepts)
        for name in ("reverse", "scale", "threshold", "warmup_steps", "cooldown_steps"):
            object.__setattr__(self, name, _per_concept(getattr(self, name), n, name))
        for t in self.threshold:
            if not 0.0 <= t <= 1.0 or math.isnan(t):
                raise ValueError(f"threshold must be a percentile in [0, 1], got {t}")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.attention_tokens not in ("all", "concept"):
            raise ValueError(f"attention_tokens must be 'all' or 'concept', got {self.attention_tokens!r}")

    @property
    def signs(self) -> list[float]:
        """Per concept, +1 to add it or −1 to remove it."""
        return [-1.0 if r else 1.0 for r in self.reverse]

    @property
    def uses_attention(self) -> bool:
        return self.masking != "noise"

    def active(self, step: int) -> list[bool]:
        """Per concept, whether it guides at `step`."""
        return [concept_is_active(step, w, c) for w, c in zip(self.warmup_steps, self.cooldown_steps)]

    def apply(self, eps_uncond, eps_edits, step, timestep, attention=None, intersect_from_timestep=None):
        """γ and the masks at `step` (see :func:`ledits_guidance`); `intersect_from_timestep` resolved."""
        return ledits_guidance(
            eps_uncond,
            eps_edits,
            step,
            timestep,
            scales=self.scale,
            thresholds=self.threshold,
            signs=self.signs,
            warmup_steps=self.warmup_steps,
            cooldown_steps=self.cooldown_steps,
            masking=self.masking,
            attention=attention,
            intersect_from_timestep=intersect_from_timestep,
        )

    def describe(self) -> dict:
        """JSON-ready settings (concepts given as embeddings are shown by shape)."""
        return {
            "concepts": [c if isinstance(c, str) else f"<embeddings {tuple(c.shape)}>" for c in self.concepts],
            "reverse": list(self.reverse),
            "scale": [float(s) for s in self.scale],
            "threshold": [float(t) for t in self.threshold],
            "warmup_steps": list(self.warmup_steps),
            "cooldown_steps": list(self.cooldown_steps),
            "masking": self.masking,
            "attention_tokens": self.attention_tokens,
            "intersect_from_timestep": self.intersect_from_timestep,
        }
