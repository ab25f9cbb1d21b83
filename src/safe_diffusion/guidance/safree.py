"""SAFREE (Yoon et al., "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image and Video
Generation", ICLR 2025), as pure functions over tensors, and :class:`SafreeGuidance`, its settings.

SAFREE does not correct noise estimates. It filters the prompt's own text embeddings and, optionally,
the denoiser's features:

1. **Toxic concept subspace.** The concept prompts (the official nudity list by default) are encoded to
   one vector each; ``P_C`` projects onto their span (:func:`projection_matrix`).
2. **Trigger tokens.** The prompt is encoded once per token with that token masked; a token is a
   trigger when the masked prompt lies at least (1 + α) times further from the toxic subspace than the
   other masked prompts do on average (:func:`trigger_tokens`).
3. **Orthogonal projection.** Trigger tokens are replaced by ``(I − P_C) P_I e``: projected onto the
   input space ``I`` (the span of the masked prompts' vectors) and then onto the complement of the toxic
   subspace (:func:`filter_matrix`, :func:`filter_tokens`); the other tokens are unchanged.
4. **Self-validating filter.** β = 1 − mean cosine similarity between the fully projected and the
   original prompt tokens decides for how many of the first denoising steps the filtered embedding is
   used (:func:`self_validation_strength`, :func:`self_validation_last_step`).
5. **Latent re-attention.** While the filter is active, the UNet's skip features of the filtered prompt
   lose the low-frequency components in which they exceed the original prompt's
   (:func:`reattend_low_frequencies`, FreeU-like, with the backbone scaling of :func:`scale_backbone`).

Every function follows the official code (github.com/jaehong31/SAFREE, cited as file:line), which is the
test oracle: ``tests/safree_official.py`` ports it and ``tests/test_safree*.py`` compare in float64.
Where the engine applies all this to a pipeline: :mod:`safe_diffusion.engine.safree`; defaults, families
and deviations: docs/guidance.md, "SAFREE".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: The official toxic concepts for nudity (generate_safree.py:246-251; sdv3/sdv3_pipeline.py:984-989).
NUDITY_CONCEPTS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)  # fmt: skip

#: The self-validating filter's sigmoid per official category (models/modified_stable_diffusion_pipeline.py:20-25):
#: (midpoint t, steepness k) of round(upper · σ(2k(10β − t))).
SVF_CURVES = {"nudity": (5.333, 2.5), "artist": (5.5, 3.5)}


# -- 1.-3. the toxic subspace, trigger tokens and their projection -------------------------------------------


def _working(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least float32 (float64 stays float64): the projections are not computed in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def projection_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """P = E (EᵀE)⁺ Eᵀ, the orthogonal projection onto the span of the rows of `vectors` (k, d) → (d, d).

    SAFREE's projection onto the toxic subspace P_C (concept vectors) and onto the input space P_I
    (masked-prompt vectors); official models/modified_stable_diffusion_pipeline.py:38-41. The pseudo-inverse
    cuts singular values below 1e-15 relative, as ``torch.pinverse`` does there.
    """
    e = _working(vectors).transpose(-1, -2)
    return e @ torch.linalg.pinv(e.transpose(-1, -2) @ e, rtol=1e-15) @ e.transpose(-1, -2)


def subspace_distances(vectors: torch.Tensor, concept_projection: torch.Tensor) -> torch.Tensor:
    """‖(I − P_C) v‖ for each row v of `vectors` (…, n, d): how far each lies from the toxic subspace."""
    v = _working(vectors)
    return (v - v @ concept_projection.transpose(-1, -2)).norm(dim=-1)


def trigger_tokens(masked_vectors: torch.Tensor, concept_projection: torch.Tensor, alpha: float) -> torch.Tensor:
    """SAFREE's trigger-token detection: per prompt token i (row i of `masked_vectors`, the prompt encoded with
    token i masked), True when d_i ≥ (1 + α)·mean_{j≠i} d_j, d = :func:`subspace_distances`.

    Masking a trigger token moves the prompt away from the toxic subspace. Official
    models/modified_stable_diffusion_pipeline.py:65-80 (a token is kept where d_i < (1 + α)·mean of the
    others). A one-token prompt has no others: the mean is undefined (NaN) and the token counts as a trigger,
    as in the official code.
    """
    d = subspace_distances(masked_vectors, concept_projection)
    n = d.shape[-1]
    others = (d.sum(dim=-1, keepdim=True) - d) / (n - 1) if n > 1 else torch.full_like(d, math.nan)
    return ~(d < (1.0 + alpha) * others)


def filter_matrix(concept_projection: torch.Tensor, input_projection: torch.Tensor) -> torch.Tensor:
    """(I − P_C) P_I: onto the input space, then onto the complement of the toxic subspace (official
    models/modified_stable_diffusion_pipeline.py:65 and :94)."""
    eye = torch.eye(concept_projection.shape[-1], dtype=concept_projection.dtype, device=concept_projection.device)
    return (eye - concept_projection) @ input_projection


def project_tokens(embeds: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Every token e of `embeds` (…, tokens, d) replaced by M e, M = :func:`filter_matrix`; in `embeds`' dtype."""
    return (_working(embeds) @ matrix.to(_working(embeds).dtype).transpose(-1, -2)).to(embeds.dtype)


def keep_mask(triggers: torch.Tensor, length: int, offset: int = 1) -> torch.Tensor:
    """(length,) bool: False at the trigger tokens' positions in the encoded sequence, True elsewhere.

    Token i of the prompt sits at position ``offset + i`` (after CLIP's start token; official
    models/modified_stable_diffusion_pipeline.py:88-89); positions past `length` are dropped.
    """
    keep = torch.ones(length, dtype=torch.bool, device=triggers.device)
    n = max(0, min(int(triggers.shape[-1]), length - offset))
    keep[offset : offset + n] = ~triggers[:n]
    return keep


def filter_tokens(embeds: torch.Tensor, matrix: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """SAFREE's filtered prompt embedding: trigger tokens (``keep`` False) projected by `matrix`, the others as
    they are (official models/modified_stable_diffusion_pipeline.py:92-98). `keep` broadcasts over `embeds`'
    token dimension (…, tokens, d)."""
    return torch.where(keep.unsqueeze(-1), embeds, project_tokens(embeds, matrix))


# -- 4. the self-validating filter -------------------------------------------------------------------------


def self_validation_strength(embeds: torch.Tensor, projected: torch.Tensor, active: torch.Tensor) -> float:
    """β = 1 − mean over the prompt's real tokens (`active`, bool over tokens) of cos(M e, e), where `projected`
    is every token projected (:func:`project_tokens`) and `embeds` the original (tokens, d).

    Official models/modified_stable_diffusion_pipeline.py:463-474.
    """
    cos = torch.nn.functional.cosine_similarity(_working(projected[active]), _working(embeds[active]), dim=-1)
    return float(1.0 - cos.mean())


def self_validation_last_step(beta: float, upper_step: int, midpoint: float, steepness: float) -> int:
    """The last denoising step (0-based, inclusive) that uses the filtered embedding:
    round(upper · σ(2k(10β − t))), t = `midpoint`, k = `steepness` (official f_beta, "sigmoid",
    models/modified_stable_diffusion_pipeline.py:19-36; used as ``i <= beta_adjusted`` at :515).
    Python's round (half to even), as there."""
    x = 2.0 * steepness * (10.0 * beta - midpoint)
    sigmoid = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    return round(upper_step * sigmoid)


# -- 5. latent re-attention in the Fourier domain ----------------------------------------------------------


def _centre(size: int, threshold: int) -> slice:
    centre = size // 2
    return slice(centre - threshold, centre + threshold)


def reattend_low_frequencies(
    filtered: torch.Tensor, original: torch.Tensor, scale: float, threshold: int = 1
) -> torch.Tensor:
    """SAFREE's latent re-attention on features (…, H, W) of the filtered prompt, against the same features of
    the original prompt: in the centred low-frequency window (2·threshold wide) of their 2-D Fourier
    transforms, each component where the filtered one's real part is not below the original's is set to
    `scale`; the others and every higher frequency are kept.

    Official free_lunch_utils.py:21-47 (``SafeGuard_Low_Fourier_filter``: the component is *replaced* by the
    scale, ``torch.where(C.real > 0., low_x_freq[1], scale)``, :37). Computed in float32, or float64 for
    float64 features (the official code always casts to float32).
    """
    dtype = filtered.dtype
    x = torch.fft.fftshift(torch.fft.fftn(_working(filtered), dim=(-2, -1)), dim=(-2, -1))
    ref = torch.fft.fftshift(torch.fft.fftn(_working(original), dim=(-2, -1)), dim=(-2, -1))
    window = (..., _centre(x.shape[-2], threshold), _centre(x.shape[-1], threshold))
    low = x[window]
    x[window] = torch.where((ref[window] - low).real > 0, low, torch.full_like(low, scale))
    return torch.fft.ifftn(torch.fft.ifftshift(x, dim=(-2, -1)), dim=(-2, -1)).real.to(dtype)


def scale_backbone(hidden: torch.Tensor, factor: float) -> torch.Tensor:
    """FreeU's backbone factor b on the first half of the channels (dim 1) of up-block features (official
    free_lunch_utils.py:171, ``hidden_states[:, :640] * b1`` for 1280 channels)."""
    if factor == 1.0:
        return hidden
    half = hidden.shape[1] // 2
    return torch.cat([hidden[:, :half] * factor, hidden[:, half:]], dim=1)


# -- the settings -----------------------------------------------------------------------------------------


def _check_number(name: str, value, *, minimum: float | None = None, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"SAFREE's {name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"SAFREE's {name} must be at least {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class SafreeGuidance:
    """SAFREE (Yoon et al., ICLR 2025): filter the prompt's toxic tokens out of its text embeddings.

    ``with guide(pipe, SafreeGuidance()): pipe(prompt)`` on SD 1.x/2.x, SDXL and SD 3 (with T5); composes
    with :class:`~safe_diffusion.SafetyGuidance` and :class:`~safe_diffusion.SemanticGuidance` in one
    ``guide()``. Defaults are the official code's (github.com/jaehong31/SAFREE):

    * ``concepts``: the toxic concepts spanning the subspace (the nudity list, generate_safree.py:246-251).
    * ``alpha`` = 0.01: trigger-token margin (generate_safree.py:415 ``--sf_alpha``; sdv3_pipeline.py:1075).
    * ``self_validation``: the self-validating filter; None = as the official code per family: on for
      SD 1.x/2.x (scripts/run_nudity.sh ``-svf``), off for SDXL and SD 3, whose official pipelines have none.
    * ``upper_step`` = 10 (``--up_t``, generate_safree.py:418), ``svf_midpoint`` = 5.333 and
      ``svf_steepness`` = 2.5 (the nudity curve; :data:`SVF_CURVES`, ``from_preset("artist")``).
    * ``filter_steps``: without the self-validating filter, the inclusive range of steps using the filtered
      embedding; None = every step (the official ``--re_attn_t -1,1001``, generate_safree.py:416).
    * ``concepts_as_negative_prompt`` = True: the negative prompt is ", ".join(concepts), as every official
      run does (generate_safree.py:258, :299, :319; sdv3_pipeline.py:991). A call that passes its own
      negative prompt is then refused.
    * ``re_attention`` = False: the latent re-attention in the Fourier domain with ``freeu_b1`` = 1.0,
      ``freeu_b2`` = 1.0, ``freeu_s1`` = 0.9, ``freeu_s2`` = 0.2 (``--freeu_hyp``, generate_safree.py:417) and
      ``re_attention_threshold`` = 1 (free_lunch_utils.py:172). Off by default because the official scripts,
      though they pass ``-lra``, register the FreeU blocks without a SAFREE mode (generate_safree.py:227-228),
      so the released code never changes a feature; True applies free_lunch_utils.py's "low" filter while
      the text filter is active (UNet families only).
    """

    concepts: Sequence[str] = NUDITY_CONCEPTS
    alpha: float = 0.01
    self_validation: bool | None = None
    upper_step: int = 10
    svf_midpoint: float = SVF_CURVES["nudity"][0]
    svf_steepness: float = SVF_CURVES["nudity"][1]
    filter_steps: tuple[int, int] | None = None
    concepts_as_negative_prompt: bool = True
    re_attention: bool = False
    freeu_b1: float = 1.0
    freeu_b2: float = 1.0
    freeu_s1: float = 0.9
    freeu_s2: float = 0.2
    re_attention_threshold: int = 1

    def __post_init__(self):
        concepts = [self.concepts] if isinstance(self.concepts, str) else list(self.concepts)
        if not concepts or any(not isinstance(c, str) or not c.strip() for c in concepts):
            raise ValueError(f"SAFREE needs one or more concept texts, got {self.concepts!r}")
        object.__setattr__(self, "concepts", tuple(concepts))
        _check_number("alpha", self.alpha, minimum=0.0)
        _check_number("upper_step", self.upper_step, minimum=0, integer=True)
        _check_number("svf_midpoint", self.svf_midpoint)
        _check_number("svf_steepness", self.svf_steepness)
        for name in ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"):
            _check_number(name, getattr(self, name))
        _check_number("re_attention_threshold", self.re_attention_threshold, minimum=1, integer=True)
        for name in ("concepts_as_negative_prompt", "re_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SAFREE's {name} must be true or false, got {getattr(self, name)!r}")
        if self.self_validation is not None and not isinstance(self.self_validation, bool):
            raise ValueError(
                f"SAFREE's self_validation must be true, false or None (auto), got {self.self_validation!r}"
            )
        if self.filter_steps is not None:
            steps = list(self.filter_steps) if isinstance(self.filter_steps, (list, tuple)) else [self.filter_steps]
            if (
                len(steps) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)
                or steps[0] > steps[1]
            ):
                raise ValueError(f"SAFREE's filter_steps must be two integers [first, last], got {self.filter_steps!r}")
            object.__setattr__(self, "filter_steps", tuple(steps))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> SafreeGuidance:
        """The official settings of a category: "nudity" (the defaults) or "artist" (the artist curve of the
        self-validating filter, models/modified_stable_diffusion_pipeline.py:20-22; give ``concepts``, e.g.
        ``["Van Gogh"]`` as generate_safree.py:254 does)."""
        if name not in SVF_CURVES:
            raise ValueError(f"unknown SAFREE preset {name!r}; choose one of: {', '.join(SVF_CURVES)}")
        if name == "artist" and "concepts" not in overrides:
            raise ValueError('SafreeGuidance.from_preset("artist") needs concepts, e.g. concepts=["Van Gogh"]')
        midpoint, steepness = SVF_CURVES[name]
        return cls(**{"svf_midpoint": midpoint, "svf_steepness": steepness, **overrides})

    def describe(self, prediction: str | None = None) -> dict:
        """Every setting, JSON-ready, with ``"type"`` (`prediction` is accepted for the terms' interface: SAFREE
        acts on text embeddings and features, the same whatever the denoiser predicts)."""
        return self.to_config()

    def to_config(self) -> dict:
        """The constructor arguments, JSON-ready, with ``"type": "SafreeGuidance"``."""
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_config(cls, config: dict) -> SafreeGuidance:
        """The term a :meth:`to_config` (or :meth:`describe`) output describes; also any dict of some of the
        options (the rest default), e.g. ``{"alpha": 0.02, "re_attention": True}``. A config of another type or
        with unknown keys raises ValueError."""
        if not isinstance(config, dict):
            raise ValueError(f"a SafreeGuidance config is a dict, got {type(config).__name__}")
        config = dict(config)
        kind = config.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"a {kind} config cannot build a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"SafreeGuidance has no setting {', '.join(map(repr, unknown))}")
        return cls(**config)

    def resolved_self_validation(self, family: str) -> bool:
        """Whether the self-validating filter runs on `family` ("sd", "sdxl", "sd3"): the setting, or for None
        the official code's choice (on for SD 1.x/2.x only)."""
        return (family == "sd") if self.self_validation is None else self.self_validation

    def backbone_factors(self) -> tuple[float, float]:
        return self.freeu_b1, self.freeu_b2

    def skip_scales(self) -> tuple[float, float]:
        return self.freeu_s1, self.freeu_s2
