"""What LEDITS++ needs of a pipeline's family: which family it is (or why it cannot be inverted), its
latents (the VAE's encoding, scaling and layout), its noise schedule, and its defaults.

The denoiser itself is the engine's (:class:`~safe_diffusion.engine.GuidedDenoiser`); the solver is
:mod:`safe_diffusion.guidance.sampling`. A family has an inversion here when its latent is an affine
mix of the clean latent and Gaussian noise with a known schedule and its VAE has an encoder:

* variance preserving, x_t = √ᾱ x_0 + √(1 − ᾱ) ε from the scheduler's ``alphas_cumprod``: Stable
  Diffusion 1.x/2.x, SDXL (diffusers' two LEDITS++ pipelines, the reference) and PixArt;
* rectified flow, x_t = (1 − σ) x_0 + σ ε on the scheduler's own (shifted) σ schedule: SD 3/3.5, FLUX
  and Qwen-Image. No reference LEDITS++ exists for them: the same edit-friendly inversion and solver
  run on their schedule (recorded as a deviation).

Refused in one line: Wan (a text-to-video model: LEDITS++ here inverts images), inpainting and
guidance-distilled (LCM) UNets, and any family the engine does not serve.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..common.errors import GuidanceError, InputError
from ..engine.adapters import FluxAdapter, PixArtAdapter, QwenImageAdapter, SD3Adapter, UNetAdapter, WanAdapter
from ..engine.attention import ATTENTION_FACTOR
from ..engine.support import served_denoisers
from ..guidance.ledits import inversion_timesteps
from ..guidance.sampling import FLOW, VP, sigmas_from_alphas_cumprod


@dataclass(frozen=True)
class EditFamily:
    """One family's LEDITS++ settings: its schedule kind, defaults, and what its text attention offers."""

    name: str
    schedule: str  # "vp" or "flow"
    default_steps: int  # diffusers' LEDITS++ defaults (SD, SDXL), the pipeline's own elsewhere
    zero_noise_steps: int  # last noise maps set to zero (diffusers' SDXL default against artifacts)
    intersect_from: int | None  # what intersect_from_timestep="auto" means
    cross_attention: bool  # M¹ masks from cross-attention to text exist
    start_token: bool  # the text tokens begin with a start token (CLIP), which attention_tokens="all" skips
    reference: bool  # diffusers has a LEDITS++ pipeline for it

    @property
    def coefficients(self):
        return VP if self.schedule == "vp" else FLOW


FAMILIES = {
    "sd": EditFamily("sd", "vp", 30, 0, 800, True, True, True),
    "sdxl": EditFamily("sdxl", "vp", 50, 3, None, True, True, True),
    "pixart": EditFamily("pixart", "vp", 20, 0, None, True, False, False),
    "sd3": EditFamily("sd3", "flow", 28, 0, None, False, True, False),
    "flux": EditFamily("flux", "flow", 28, 0, None, False, True, False),
    "qwen-image": EditFamily("qwen-image", "flow", 50, 0, None, False, False, False),
}


def edit_family(pipe) -> EditFamily:
    """The LEDITS++ family of `pipe`, or a one-line InputError naming the pipeline and what is missing."""
    name = type(pipe).__name__
    for component in ("vae", "scheduler"):
        if getattr(pipe, component, None) is None:
            raise InputError(f"{name} lacks {component}, which LEDITS++ needs")
    sdxl = getattr(pipe, "text_encoder_2", None) is not None or (
        getattr(getattr(getattr(pipe, "unet", None), "config", None), "addition_embed_type", None) == "text_time"
    )
    if getattr(pipe, "unet", None) is not None:
        needed = ["text_encoder_2", "tokenizer_2"] if sdxl else ["text_encoder", "tokenizer"]
        missing = [c for c in needed if getattr(pipe, c, None) is None]
        if missing:
            raise InputError(
                f"{name} lacks {', '.join(missing)}, which LEDITS++ needs: use a Stable Diffusion 1.x/2.x or SDXL checkpoint"
            )
        if getattr(pipe.unet.config, "cross_attention_dim", None) is None:
            raise InputError(f"the UNet of {name} has no cross-attention: LEDITS++ needs a text-conditioned UNet")
    try:
        _, module, adapter = served_denoisers(pipe)[0]
    except GuidanceError as exc:
        raise InputError(f"LEDITS++ cannot run on {name}: {str(exc).removeprefix('guide() cannot serve ')}") from None
    if issubclass(adapter, WanAdapter):
        raise InputError(f"{name} generates video; LEDITS++ here inverts and edits images, not videos")
    if not hasattr(pipe.vae, "encode") or not hasattr(pipe, "image_processor"):
        raise InputError(f"the VAE of {name} cannot encode images: LEDITS++ needs an autoencoder with an encoder")
    if issubclass(adapter, UNetAdapter):
        config = module.config
        if getattr(config, "time_cond_proj_dim", None) is not None:
            raise InputError(
                f"the UNet of {name} is guidance-distilled (LCM): LEDITS++ needs an unconditional estimate"
            )
        if config.in_channels != getattr(pipe.vae.config, "latent_channels", config.in_channels):
            raise InputError(f"the UNet of {name} is an inpainting UNet (mask channels): use the base checkpoint")
        family = FAMILIES["sdxl" if sdxl else "sd"]
    elif issubclass(adapter, PixArtAdapter):
        family = FAMILIES["pixart"]
    elif issubclass(adapter, SD3Adapter):
        family = FAMILIES["sd3"]
    elif issubclass(adapter, QwenImageAdapter):
        family = FAMILIES["qwen-image"]
    elif issubclass(adapter, FluxAdapter):
        family = FAMILIES["flux"]
    else:
        raise InputError(f"LEDITS++ has no inversion for {name} ({type(module).__name__})")
    _check_schedule(pipe, family)
    return family


def _check_schedule(pipe, family: EditFamily) -> None:
    scheduler = pipe.scheduler
    if family.schedule == "vp":
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(ac, torch.Tensor) or ac.ndim != 1:
            raise InputError(
                f"the scheduler {type(scheduler).__name__} has no DDPM noise schedule (alphas_cumprod) to invert with"
            )
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"LEDITS++ cannot invert a model predicting {prediction!r}")
    elif not callable(getattr(scheduler, "set_timesteps", None)) or not hasattr(scheduler, "sigmas"):
        raise InputError(
            f"the scheduler {type(scheduler).__name__} has no flow-matching schedule (sigmas) to invert with"
        )


def denoiser_of(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def work_dtype(pipe) -> torch.dtype:
    """Latents, noise maps and solver steps: float32 at least, even for a half-precision denoiser."""
    return torch.promote_types(denoiser_of(pipe).dtype, torch.float32)


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: 4 latent cells (32 px on SD), so the attention maps (and FLUX's
    2x2 patches) tile the latents."""
    return int(pipe.vae_scale_factor) * ATTENTION_FACTOR


def native_resolution(pipe) -> int:
    """The longest image side the model was trained at (512 for SD 1.x, 1024 for SDXL, SD3, FLUX …)."""
    size = getattr(pipe, "default_sample_size", None) or getattr(denoiser_of(pipe).config, "sample_size", None) or 64
    return int(size) * int(pipe.vae_scale_factor)


# -- latents ----------------------------------------------------------------------------------------


class _VaeIn:
    """Run the VAE in float32 where its config says float16 overflows (SDXL's VAE), and back afterwards."""

    def __init__(self, pipe):
        self.vae = pipe.vae
        self.upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)

    def __enter__(self):
        if self.upcast:
            self.vae.to(dtype=torch.float32)
        return self.vae

    def __exit__(self, *exc):
        if self.upcast:
            self.vae.to(dtype=torch.float16)


def _temporal(vae) -> bool:
    """Whether the VAE codes videos (Qwen-Image's and Wan's: (batch, channels, frames, h, w)); images are one frame."""
    return hasattr(vae.config, "temperal_downsample")


def _normalisation(vae, like: torch.Tensor):
    """(shift, scale) with latent = (z − shift) · scale, broadcast over channels where they are per channel."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        shape = (1, len(config.latents_mean), *([1] * (like.ndim - 2)))
        mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, 1.0 / std
    return getattr(config, "shift_factor", None) or 0.0, config.scaling_factor


def encode_images(pipe, image, height: int | None = None, width: int | None = None, resize_mode: str = "default"):
    """The input as normalised VAE latents (batch, C, h, w) (the latent distribution's mode) and as the resized
    PIL images encoded."""
    pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode=resize_mode)
    h, w = pixels.shape[-2:]
    multiple = size_multiple(pipe)
    if h % multiple or w % multiple:
        raise InputError(
            f"image size {w}x{h} is not a multiple of {multiple}: pass height and width (multiples of {multiple})"
        )
    resized = pipe.image_processor.postprocess(pixels, output_type="pil")
    with _VaeIn(pipe) as vae:
        pixels = pixels.to(device=pipe._execution_device, dtype=vae.dtype)
        z = vae.encode(pixels[:, :, None] if _temporal(vae) else pixels).latent_dist.mode()
    z = z.to(work_dtype(pipe))
    shift, scale = _normalisation(pipe.vae, z)
    x0 = (z - shift) * scale
    return (x0[:, :, 0] if _temporal(pipe.vae) else x0), resized


def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Latents → images in `output_type` ("pil", "np", "pt" or "latent")."""
    if output_type == "latent":
        return latents
    z = latents[:, :, None] if _temporal(pipe.vae) else latents
    shift, scale = _normalisation(pipe.vae, z)
    with _VaeIn(pipe) as vae:
        image = vae.decode((z / scale + shift).to(vae.dtype), return_dict=False)[0]
    if _temporal(pipe.vae):
        image = image[:, :, 0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


# -- the schedule -----------------------------------------------------------------------------------


def schedule(
    pipe, family: EditFamily, steps: int, skip: float, final_sigma: str, latent_shape
) -> tuple[list, torch.Tensor]:
    """(timesteps in the pipeline scheduler's units, float64 noise levels with the final one appended).

    VP: the last n of ⌊n(1 + skip)⌋ DPM-Solver "leading" timesteps, σ = √((1 − ᾱ)/ᾱ), as LEDITS++ does.
    Flow: the last n of the scheduler's own ⌊n(1 + skip)⌋-step schedule (shifted as the pipeline shifts it,
    with the image's token count where the shift is dynamic), ending at σ = 0 as the pipeline does
    (`final_sigma="zero"`), or with `final_sigma="min"` the last n + 1 points of its schedule with one more
    point, so that the last step ends at a small nonzero σ (the scheduler's smallest on SD3).
    VP `final_sigma`: "min", the smallest noise level of the training schedule (exact reconstruction, as
    LEDITS++'s code), or "zero" (diffusers' LEDITS++).
    """
    if final_sigma not in ("min", "zero"):
        raise ValueError(f"final_sigma must be 'min' or 'zero', got {final_sigma!r}")
    config = pipe.scheduler.config
    if family.schedule == "vp":
        timesteps = inversion_timesteps(
            int(config.num_train_timesteps), steps, skip, int(getattr(config, "steps_offset", 0) or 0)
        )
        all_sigmas = sigmas_from_alphas_cumprod(pipe.scheduler.alphas_cumprod.detach().cpu().to(torch.float64))
        last = all_sigmas[0] if final_sigma == "min" else torch.zeros((), dtype=torch.float64)
        return list(timesteps), torch.stack([all_sigmas[t] for t in timesteps] + [last])
    total = int(steps * (1 + skip))
    if final_sigma == "zero":  # the pipeline's own: n steps, then its terminal σ = 0
        sigmas, timesteps = _flow_schedule(pipe, total, latent_shape)
        return timesteps[-steps:], torch.cat([sigmas[-steps:], torch.zeros(1, dtype=torch.float64)])
    # the scheduler's schedule with one more point, whose last (its smallest σ on SD3) is where the edit ends
    sigmas, timesteps = _flow_schedule(pipe, total + 1, latent_shape)
    return timesteps[total - steps : total], sigmas[total - steps :]


def _flow_schedule(pipe, n: int, latent_shape) -> tuple[torch.Tensor, list]:
    """The scheduler's n noise levels (float64, without its terminal 0) and timesteps, on a copy of it."""
    scheduler = copy.deepcopy(pipe.scheduler)
    config = scheduler.config
    if getattr(config, "use_dynamic_shifting", False):
        # as FLUX's and Qwen-Image's pipelines: σ from 1 to 1/n, shifted by μ from the image's token count
        tokens = math.prod(s // 2 for s in latent_shape[-2:])  # 2x2 patches
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (high - low) / (top - base)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=tokens * slope + (low - slope * base))
    else:
        scheduler.set_timesteps(n)  # as SD3's pipeline: the scheduler's own (statically shifted) schedule
    sigmas = scheduler.sigmas.detach().cpu().to(torch.float64)[:n]
    return sigmas, [float(t) for t in scheduler.timesteps[:n]]
