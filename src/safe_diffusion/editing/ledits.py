"""LEDITS++ on a diffusers pipeline the user already has, on the engine's guided denoiser and the one sampler.

``invert(pipe, image)`` → :class:`LEditsPPInversion`; ``edit(pipe, inversion, LEditsGuidance([...]))``
→ :class:`LEditsPPOutput`; :func:`edit_image` does both. Three pieces do the work:

* the engine's :class:`~safe_diffusion.engine.GuidedDenoiser`: the pipeline's own denoiser, text
  encoding and argument conventions, with :class:`~safe_diffusion.guidance.ledits.LEditsGuidance` as
  its guidance term (the concept rows ride with the unconditional row in one denoiser call per step;
  the term's masks read the cross-attention the engine observes);
* :mod:`safe_diffusion.guidance.sampling`: SDE-DPM-Solver++(2M) with k-diffusion's signature, whose
  edit-friendly inversion records the noise maps that :class:`~safe_diffusion.guidance.sampling.ReplayNoise`
  replays during the edit;
* :mod:`.latents`: the family's VAE latents and noise schedule, and the refusal of what cannot be inverted.

Families: SD 1.x/2.x and SDXL (parity with diffusers' ``LEditsPPPipelineStableDiffusion(XL)`` in float64),
PixArt, SD 3/3.5, FLUX and Qwen-Image (no reference exists; see :mod:`.latents` and docs/sanitize.md).
The pipeline is left exactly as it was: no scheduler swap, no attention processors replaced.

Deviations from diffusers' ``LEditsPPPipelineStableDiffusion(XL)`` (each recorded in ``settings``):

* ``final_sigma="min"`` (default): the last step ends at the schedule's smallest noise level, as
  LEDITS++'s own code does, so the inversion records a noise map for it and reconstructs the
  latents exactly. diffusers ≥ 0.2x ends at σ = 0, which makes the last step deterministic and the
  reconstruction off by the denoiser's error there; ``final_sigma="zero"`` reproduces it.
* The solver never swaps to the pipeline's scheduler: inversion and edit use the same
  SDE-DPM-Solver++(2M) steps, whatever scheduler the pipeline carries.
* SDXL's size conditioning is (height, width); diffusers' LEDITS++ passes (width, height), which
  differs for non-square images only.
* Images in a batch are independent: diffusers' attention store mixes images of a batch.
* A source prompt guides the inversion towards it, ε_∅ + s(ε_src − ε_∅); diffusers' SD LEDITS++
  unpacks its two embeddings in the wrong order and computes ε_src + s(ε_∅ − ε_src).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..common.errors import InputError
from ..engine.attention import attention_factor
from ..engine.denoiser import GuidedDenoiser
from ..guidance.ledits import LEditsGuidance
from ..guidance.sampling import ReplayNoise, denoised, invert_dpmpp_2m_sde, noised, sample_dpmpp_2m_sde
from .latents import (
    EditFamily,
    decode_latents,
    denoiser_of,
    edit_family,
    encode_images,
    schedule,
    size_multiple,
)

Family = str  # "sd", "sdxl", "pixart", "sd3", "flux", "qwen-image"
Progress = Callable[[str, int, int], None]
SOLVER = "SDE-DPM-Solver++(2M), midpoint, first order on the first step"
METHOD = "LEDITS++ (Brack et al., CVPR 2024)"

__all__ = [
    "LEditsPPInversion",
    "LEditsPPOutput",
    "decode_latents",
    "edit",
    "edit_image",
    "encode_images",
    "invert",
    "pipeline_family",
    "resolved_settings",
    "size_multiple",
]


@dataclass
class LEditsPPInversion:
    """An inverted image batch: what :func:`edit` needs to reconstruct or edit it."""

    x0: torch.Tensor  # (batch, C, *spatial) the VAE latents of the input
    xT: torch.Tensor  # the latents the edit starts from
    noise_maps: torch.Tensor  # (steps, batch, C, *spatial) z per step, noisiest step first
    timesteps: list[int]
    sigmas: torch.Tensor  # (steps + 1,) float64 noise levels, the last one where the edit ends
    images: list[PIL.Image.Image]  # the inputs as encoded (resized)
    family: Family  # the LEDITS++ family name (see pipeline_family)
    negative_prompt: str | None
    settings: dict


@dataclass
class LEditsPPOutput(BaseOutput):
    """Edited images, where the edit acted, and the settings that made them.

    ``masks``: per image, the union over steps and concepts of the masks the edit guidance was
    applied through, at image resolution (PIL "L" images, 255 = touched; a (batch, H, W) bool
    array for ``output_type="np"``). ``mask_coverage``: the share of the image's pixels in it.
    ``concept_masks`` (batch, concepts, *latent) and ``step_masks`` (steps, concepts, batch,
    *latent) are the latent-resolution masks per concept and per step.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray
    mask_coverage: list[float]
    concept_masks: torch.Tensor
    step_masks: torch.Tensor
    settings: dict = field(default_factory=dict)


def pipeline_family(pipe) -> Family:
    """The LEDITS++ family of `pipe` ("sd", "sdxl", "pixart", "sd3", "flux", "qwen-image"); a one-line InputError
    naming the pipeline and what is missing or why it cannot be inverted otherwise."""
    return edit_family(pipe).name


def _prediction(pipe, family: EditFamily) -> str:
    if family.schedule == "flow":
        return "flow"
    return getattr(pipe.scheduler.config, "prediction_type", None) or "epsilon"


class _Denoiser:
    """k-diffusion's denoiser D(x, σ) over the guided denoiser: the data prediction x̂_0 at the schedule's σ."""

    def __init__(self, den: GuidedDenoiser, conditioning, timesteps, sigmas, prediction, family, progress, stage):
        self.den, self.conditioning = den, conditioning
        self.family, self.prediction = family, prediction
        self.sigmas = sigmas
        self.levels = sigmas[:-1]
        dtype = torch.int64 if family.schedule == "vp" else torch.float32
        self.timesteps = [torch.as_tensor(t).to(dtype) for t in timesteps]
        self.progress, self.stage = progress, stage

    def index(self, sigma: torch.Tensor) -> int:
        return int((self.levels - float(sigma.flatten()[0])).abs().argmin())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i = self.index(sigma)
        out = self.den(x, self.timesteps[i].to(x.device), self.conditioning, step=i)
        x0 = denoised(x, out, self.levels[i].to(x.device), self.prediction, self.family.coefficients)
        if self.progress is not None:
            self.progress(self.stage, i + 1, len(self.levels))
        return x0


def _arguments(family: EditFamily) -> dict:
    """The pipeline-call arguments LEDITS++ encodes and calls with (the pipelines' own defaults)."""
    return {}


@torch.no_grad()
def invert(
    pipe,
    image,
    *,
    num_inversion_steps: int | None = None,
    skip: float = 0.15,
    source_prompt: str = "",
    source_guidance_scale: float = 3.5,
    negative_prompt: str | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    height: int | None = None,
    width: int | None = None,
    resize_mode: str = "default",
    final_sigma: Literal["min", "zero"] = "min",
    unet_batch_size: int | None = None,
    progress: Progress | None = None,
) -> LEditsPPInversion:
    """Invert `image` (a PIL image, array, tensor or a list of them, one size) for LEDITS++ (§3.1).

    `num_inversion_steps` (default 30 on SD, 50 on SDXL, the pipeline's own elsewhere) are the steps the
    edit will take; `skip` drops the noisiest fraction of the schedule. With a `source_prompt`, the
    inversion's estimates use classifier-free guidance at `source_guidance_scale`, as in the reference.
    `generator` draws the auxiliary sequence's noise (one per image for a batch).
    """
    family = edit_family(pipe)
    steps = family.default_steps if num_inversion_steps is None else int(num_inversion_steps)
    if steps < 1:
        raise InputError(f"num_inversion_steps must be positive, got {steps}")
    if not 0.0 <= skip < 1.0:
        raise InputError(f"skip must be in [0, 1), got {skip}")
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe._execution_device
    x0, resized = encode_images(pipe, image, height=height, width=width, resize_mode=resize_mode)
    size = (resized[0].height, resized[0].width)
    timesteps, sigmas = schedule(pipe, family, steps, skip, final_sigma, x0.shape[2:])
    prediction = _prediction(pipe, family)
    cfg = bool(source_prompt) and source_guidance_scale > 1.0

    # The auxiliary sequence (edit-friendly: independent noise per step), drawn from the least noisy step up.
    xs: list[torch.Tensor] = [x0] * (steps + 1)
    for i in reversed(range(steps)):
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        xs[i] = noised(x0, noise, sigmas[i].to(device), family.coefficients)
    with GuidedDenoiser(
        pipe, guidance_scale=source_guidance_scale, arguments=_arguments(family), rows_per_call=unet_batch_size
    ) as den:
        conditioning = den.encode(source_prompt if cfg else None, negative_prompt)
        model = _Denoiser(den, conditioning, timesteps, sigmas.to(device), prediction, family, progress, "invert")
        zs, x_t = invert_dpmpp_2m_sde(model, xs, sigmas.to(device), coefficients=family.coefficients)
    settings = {
        "method": METHOD,
        "family": family.name,
        "pipeline": type(pipe).__name__,
        "num_inversion_steps": steps,
        "skip": float(skip),
        "timesteps": list(timesteps),
        "solver": SOLVER,
        "schedule": family.schedule,
        "final_sigma": final_sigma,
        "prediction_type": prediction,
        "source_prompt": source_prompt if cfg else "",
        "source_guidance_scale": float(source_guidance_scale) if cfg else None,
        "negative_prompt": negative_prompt,
        "height": size[0],
        "width": size[1],
        "dtype": str(denoiser_of(pipe).dtype).removeprefix("torch."),
        "work_dtype": str(x0.dtype).removeprefix("torch."),
    }
    return LEditsPPInversion(
        x0=x0,
        xT=x_t,
        noise_maps=zs,
        timesteps=list(timesteps),
        sigmas=sigmas,
        images=resized,
        family=family.name,
        negative_prompt=negative_prompt,
        settings=settings,
    )


def _for_family(guidance: LEditsGuidance, family: EditFamily) -> tuple[LEditsGuidance, list[str]]:
    """The edit as this family runs it: "auto" resolved; masks and attention tokens the family has (with notes)."""
    notes = []
    changes: dict[str, Any] = {}
    if guidance.intersect_from_timestep == "auto":
        changes["intersect_from_timestep"] = family.intersect_from
    if guidance.uses_attention and not family.cross_attention:
        if guidance.masking == "cross_attention":
            raise InputError(
                f"masking='cross_attention' needs cross-attention to text, which {family.name} does not have "
                "(joint attention): use masking='noise' or 'intersect'"
            )
        changes["masking"] = "noise"
        notes.append(f"noise masks (M²) only: {family.name} has joint attention, no cross-attention maps for M¹")
    elif guidance.uses_attention and not family.start_token and guidance.attention_tokens == "all":
        changes["attention_tokens"] = "concept"
        notes.append(
            f"attention maps from each concept's own tokens: {family.name}'s text encoder has no start token, "
            "which LEDITS++'s 'all tokens' convention skips"
        )
    return (dataclasses.replace(guidance, **changes) if changes else guidance), notes


def _mask_images(union: torch.Tensor, size: tuple[int, int], output_type: str):
    """Latent-resolution masks (batch, *latent) → image resolution, nearest neighbour."""
    up = torch.nn.functional.interpolate(union[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    array = up.cpu().numpy()
    if output_type == "pil":
        return [PIL.Image.fromarray((m * 255).astype(np.uint8), mode="L") for m in array]
    return array


@torch.no_grad()
def edit(
    pipe,
    inversion: LEditsPPInversion,
    guidance: LEditsGuidance | None = None,
    *,
    zero_noise_steps: int | None = None,
    output_type: str = "pil",
    unet_batch_size: int | None = None,
    progress: Progress | None = None,
) -> LEditsPPOutput:
    """Denoise `inversion` with the edit `guidance` (§3.2–3.3); without guidance, reconstruct the input.

    `zero_noise_steps` (default 0, 3 on SDXL, as diffusers) sets the last steps' noise maps to
    zero. `unet_batch_size` caps the rows per denoiser call (1 + concepts per image otherwise).
    """
    family = edit_family(pipe)
    if family.name != inversion.family:
        raise InputError(f"this inversion was made with an {inversion.family} pipeline, not an {family.name} one")
    if guidance is not None:
        concepts = list(guidance.concepts)
        texts = [c for c in concepts if isinstance(c, str)]
        if texts and len(texts) != len(concepts):
            raise ValueError("give edit concepts all as text or all as embeddings")
        guidance, notes = _for_family(guidance, family)
    else:
        notes = []
    device = pipe._execution_device
    batch = inversion.xT.shape[0]
    steps = len(inversion.timesteps)
    zero = family.zero_noise_steps if zero_noise_steps is None else int(zero_noise_steps)
    zs = inversion.noise_maps.clone()
    if zero > 0:
        zs[-zero:] = 0
    sigmas = inversion.sigmas.to(device)
    prediction = _prediction(pipe, family)
    terms = [] if guidance is None else [guidance]
    try:
        den = GuidedDenoiser(pipe, *terms, arguments=_arguments(family), rows_per_call=unet_batch_size)
    except InputError as exc:  # a guidance the family cannot run (embeddings where pooled text is needed …)
        raise ValueError(str(exc)) from None
    with den:
        conditioning = den.encode(None, inversion.negative_prompt)
        model = _Denoiser(den, conditioning, inversion.timesteps, sigmas, prediction, family, progress, "edit")
        x = sample_dpmpp_2m_sde(
            model, inversion.xT, sigmas, noise_sampler=ReplayNoise(zs, sigmas), coefficients=family.coefficients
        )
        record = den.states[0] if terms else ()

    n = 0 if guidance is None else len(guidance.concepts)
    latent_spatial = inversion.xT.shape[2:]
    step_masks = torch.zeros(steps, n, batch, *latent_spatial, dtype=torch.bool)
    for step, masks in record:
        for c, mask in enumerate(masks):
            if mask is not None:
                step_masks[step, c] = mask.cpu()
    images = decode_latents(pipe, x, output_type)
    size = (inversion.images[0].height, inversion.images[0].width)
    concept_masks = step_masks.any(dim=0).transpose(0, 1)  # (batch, concepts, *latent)
    union = concept_masks.any(dim=1) if n else torch.zeros(batch, *latent_spatial, dtype=torch.bool)
    coverage = [float(m.float().mean()) for m in union]
    mask_out = _mask_images(union, size, "pil" if output_type == "pil" else "np")
    uses_attention = guidance is not None and guidance.uses_attention
    settings = dict(inversion.settings)
    settings.update(
        {
            "guidance": None if guidance is None else guidance.describe(),
            "intersect_from_timestep": None if guidance is None else guidance.intersect_from_timestep,
            "attention_resolution_factor": attention_factor(denoiser_of(pipe)) if uses_attention else None,
            "zero_noise_steps": zero,
            "deviations_from_diffusers": _deviations(settings, family) + notes,
        }
    )
    return LEditsPPOutput(
        images=images,
        masks=mask_out,
        mask_coverage=coverage,
        concept_masks=concept_masks,
        step_masks=step_masks,
        settings=settings,
    )


def _deviations(settings: dict, family: EditFamily) -> list[str]:
    notes = ["inversion and edit use their own SDE-DPM-Solver++(2M) steps, not the pipeline's scheduler"]
    if settings.get("final_sigma") == "min":
        notes.append("the last step ends at the smallest noise level (LEDITS++'s code), not at 0: exact reconstruction")
    if family.name == "sdxl" and settings.get("height") != settings.get("width"):
        notes.append("SDXL size conditioning is (height, width); diffusers' LEDITS++ passes (width, height)")
    if family.name == "sd" and settings.get("source_prompt"):
        notes.append("the source prompt guides the inversion towards it; diffusers' SD LEDITS++ swaps its embeddings")
    if not family.reference:
        notes.append(
            f"no reference LEDITS++ for {family.name}: the same edit-friendly inversion and solver on its "
            + (
                "DDPM schedule"
                if family.schedule == "vp"
                else "flow-matching schedule (σ from the pipeline's scheduler)"
            )
        )
    return notes


def edit_image(
    pipe,
    image,
    guidance: LEditsGuidance | None = None,
    *,
    num_inversion_steps: int | None = None,
    skip: float = 0.15,
    source_prompt: str = "",
    source_guidance_scale: float = 3.5,
    negative_prompt: str | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    height: int | None = None,
    width: int | None = None,
    final_sigma: Literal["min", "zero"] = "min",
    zero_noise_steps: int | None = None,
    output_type: str = "pil",
    unet_batch_size: int | None = None,
    progress: Progress | None = None,
) -> LEditsPPOutput:
    """Invert `image` and edit it with `guidance` in one call: ``edit_image(pipe, img, LEditsGuidance(["blood"],
    reverse=True))``. Arguments as in :func:`invert` and :func:`edit`."""
    inversion = invert(
        pipe,
        image,
        num_inversion_steps=num_inversion_steps,
        skip=skip,
        source_prompt=source_prompt,
        source_guidance_scale=source_guidance_scale,
        negative_prompt=negative_prompt,
        generator=generator,
        height=height,
        width=width,
        final_sigma=final_sigma,
        unet_batch_size=unet_batch_size,
        progress=progress,
    )
    return edit(
        pipe,
        inversion,
        guidance,
        zero_noise_steps=zero_noise_steps,
        output_type=output_type,
        unet_batch_size=unet_batch_size,
        progress=progress,
    )


def resolved_settings(
    pipe, family: Family, guidance: LEditsGuidance | None, steps: int | None, final_sigma: str = "min"
) -> dict[str, Any]:
    """The LEDITS++ settings :func:`edit_image` will use on `pipe` with these arguments, defaults resolved."""
    fam = edit_family(pipe)
    notes: list[str] = []
    if guidance is not None:
        guidance, notes = _for_family(guidance, fam)
    uses_attention = guidance is not None and guidance.uses_attention
    settings = {
        "method": METHOD,
        "family": fam.name,
        "pipeline": type(pipe).__name__,
        "num_inversion_steps": fam.default_steps if steps is None else int(steps),
        "solver": SOLVER,
        "schedule": fam.schedule,
        "final_sigma": final_sigma,
        "zero_noise_steps": fam.zero_noise_steps,
        "intersect_from_timestep": None if guidance is None else guidance.intersect_from_timestep,
        "masking": None if guidance is None else guidance.masking,
        "attention_resolution_factor": attention_factor(denoiser_of(pipe)) if uses_attention else None,
        "prediction_type": _prediction(pipe, fam),
        "dtype": str(denoiser_of(pipe).dtype).removeprefix("torch."),
    }
    settings["deviations_from_diffusers"] = _deviations(settings, fam) + notes
    return settings
