"""LEDITS++ (Brack et al., CVPR 2024), as pure functions over tensors.

Three parts, in the paper's order:

* **Inversion** (§3.1): the timesteps here (:func:`inversion_timesteps`); the solver and the
  edit-friendly inversion are :mod:`safe_diffusion.guidance.sampling` (SDE-DPM-Solver++(2M) with
  k-diffusion's signature, and the noise maps that make it retrace an auxiliary sequence).
* **Edit guidance** (§3.2). Several concepts at once, in SEGA's vocabulary (reverse direction,
  scale s_e, threshold λ, warm-up, cool-down): ε̂ = ε_∅ + Σ_i M_i · ψ_i with
  ψ_i = ±s_{e,i} (ε_{e_i} − ε_∅).
* **Implicit masking** (§3.3, eq. 12). M¹_i, the cross-attention mask: the concept's attention
  map, smoothed, kept above its λ-quantile. M²_i, the noise-estimate mask: Σ_channels |ψ_i| kept
  above its λ-quantile. M_i = M¹_i ∩ M²_i.

:class:`LEditsGuidance` is a guidance term (the :class:`~safe_diffusion.guidance.terms.GuidanceTerm`
protocol) with the engine's one extension for masks: it declares ``observes`` and receives, through
``apply_observed``, the denoiser's timestep and its concept rows' cross-attention maps
(:class:`~safe_diffusion.engine.parts.Observation`); its per-run state records each step's masks.
Every function works on any latent layout (batch, channels, *spatial): images, video, 3-D. Nothing
here knows about pipelines, schedulers, tokenizers or devices.
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
from .terms import Concept, _per_concept, resolve_space

Masking = Literal["intersect", "cross_attention", "noise"]
MASKINGS = ("intersect", "cross_attention", "noise")

#: The SLD safety concept (Schramowski et al., CVPR 2023) split into its parts: what `sanitize`
#: removes by default, one LEDITS++ edit (and one implicit mask) per part.
SAFETY_CONCEPTS: tuple[str, ...] = tuple(
    part.strip() for part in DEFAULT_SAFETY_CONCEPT.removeprefix("an image showing ").split(",")
)


# -- noise schedule --------------------------------------------------------------------------------


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


def cross_attention_mask(attention: torch.Tensor, threshold: float, latent_shape: Sequence[int]) -> torch.Tensor:
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
    `intersect_from_timestep`: see :func:`ledits_guidance`; "auto" is resolved per family by the
    LEDITS++ API (:mod:`safe_diffusion.editing.ledits`): 800 on Stable Diffusion 1.x/2.x and None (every
    step) on SDXL, as in diffusers' two LEDITS++ pipelines, None elsewhere; attached with ``guide()`` it
    means None.

    As a guidance term it also runs inside a pipeline's own call (``guide(pipe, LEditsGuidance(...))``:
    semantic guidance with implicit masks), where the engine captures the cross-attention maps.
    """

    concepts: Sequence[Concept] = ()
    reverse: bool | Sequence[bool] = False
    scale: float | Sequence[float] = 5.0
    threshold: float | Sequence[float] = 0.9
    warmup_steps: int | Sequence[int] = 0
    cooldown_steps: int | Sequence[int | None] | None = None
    masking: Masking = "intersect"
    attention_tokens: Literal["all", "concept"] = "all"
    intersect_from_timestep: int | Literal["auto"] | None = "auto"

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

    # -- the GuidanceTerm protocol, and its extension for masks ------------------------------------
    #: The masks are quantiles per sample and γ is linear in ψ, so acting on the model's own output is the
    #: same as acting on its ε-equivalent (a per-sample factor): "model" for every prediction type.
    space = "model"

    @property
    def observes(self) -> tuple[str, ...]:
        """What the engine must hand :meth:`apply_observed`: the timestep, and the cross-attention maps unless
        masking is "noise"."""
        return ("timestep", "cross_attention") if self.uses_attention else ("timestep",)

    def needs(self, step: int) -> list[bool]:
        return self.active(step)

    def initial_state(self) -> tuple:
        """The run's mask record: one ``(step, masks)`` per evaluation, masks per concept (batch, 1, *spatial)
        booleans or None where the concept did not guide."""
        return ()

    def apply(self, eps_uncond, eps_text, eps_concepts, step, state, guidance_scale):
        """Δ without observations: only masking="noise" can run so."""
        return self.apply_observed(eps_uncond, eps_text, eps_concepts, step, state, guidance_scale, None)

    def apply_observed(self, eps_uncond, eps_text, eps_concepts, step, state, guidance_scale, observed):
        """Δ = γ / s_g, the edit guidance as a correction of ε_p (the guided estimate is then
        ε_∅ + s_g(ε_p − ε_∅) + γ; without a prompt, ε_∅ + γ), and the state with this step's masks."""
        attention = None
        if self.uses_attention:
            if observed is None or observed.attention is None:
                raise ValueError(
                    f"masking {self.masking!r} needs cross-attention maps, which this run does not observe"
                )
            attention = [
                None if a is None else self.attention_map(a, observed.token_spans[i])
                for i, a in enumerate(observed.attention)
            ]
        timestep = None if observed is None else observed.timestep
        intersect = None if self.intersect_from_timestep == "auto" else self.intersect_from_timestep
        gamma, masks = self.apply_at(eps_uncond, eps_concepts, step, timestep, attention, intersect)
        record = [None if m is None else m[:, 0] > 0 for m in masks]
        return gamma / guidance_scale, (*state, (step, record))

    def attention_map(self, attention: torch.Tensor, span: slice | None) -> torch.Tensor:
        """A concept's map (batch, *spatial) from its rows' attention (batch, *spatial, tokens): summed over every
        position after the start token but the last ("all"), or over the concept's own tokens ("concept")."""
        if self.attention_tokens == "all":
            tokens = slice(1, attention.shape[-1] - 1)
        elif span is None:
            raise TypeError("attention_tokens='concept' needs concepts given as text")
        else:
            tokens = span
        return attention[..., tokens].sum(dim=-1)

    def apply_at(self, eps_uncond, eps_edits, step, timestep, attention=None, intersect_from_timestep=None):
        """γ and the masks at `step` (see :func:`ledits_guidance`), `intersect_from_timestep` resolved."""
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

    def describe(self, prediction: str | None = None) -> dict:
        """JSON-ready settings (concepts given as embeddings are shown by shape)."""
        out = {
            "type": type(self).__name__,
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
        if prediction is not None:
            out["prediction"] = prediction
            out["acts_in"] = resolve_space(self.space, prediction)
        return out
