"""LEDITS++ on a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline the user already has.

``invert(pipe, image)`` → :class:`LEditsPPInversion`; ``edit(pipe, inversion, LEditsGuidance([...]))``
→ :class:`LEditsPPOutput`; :func:`edit_image` does both. The pipeline's own components do the
work (its VAE, text encoders with ``encode_prompt``, UNet, image processor, and its scheduler's
noise schedule ``alphas_cumprod``); the math is :mod:`safe_diffusion.guidance.ledits`. The
pipeline is left exactly as it was: no scheduler swap, no attention processors replaced — the
cross-attention maps the masks need are read by forward pre-hooks that exist only during an edit.

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..common.errors import InputError
from ..guidance.ledits import (
    LEditsGuidance,
    denoised,
    inversion_timesteps,
    noise_map,
    noised,
    sde_dpmpp_mean,
    sde_dpmpp_noise_scale,
    sde_dpmpp_step,
    sigmas_from_alphas_cumprod,
)

Family = Literal["sd", "sdxl"]
#: Defaults per family, as in diffusers' two LEDITS++ pipelines.
DEFAULT_STEPS = {"sd": 30, "sdxl": 50}
DEFAULT_ZERO_NOISE_STEPS = {"sd": 0, "sdxl": 3}
DEFAULT_INTERSECT_FROM = {"sd": 800, "sdxl": None}
#: LEDITS++ reads cross-attention at 1/4 of the latent resolution (16x16 for SD at 512 px).
ATTENTION_FACTOR = 4
Progress = Callable[[str, int, int], None]


@dataclass
class LEditsPPInversion:
    """An inverted image batch: what :func:`edit` needs to reconstruct or edit it."""

    x0: torch.Tensor  # (batch, C, *spatial) the VAE latents of the input
    xT: torch.Tensor  # the latents the edit starts from
    noise_maps: torch.Tensor  # (steps, batch, C, *spatial) z per step, noisiest step first
    timesteps: list[int]
    sigmas: torch.Tensor  # (steps + 1,) float64 noise levels, the last one where the edit ends
    images: list[PIL.Image.Image]  # the inputs as encoded (resized)
    family: Family
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


# -- the pipeline ---------------------------------------------------------------------------------


def pipeline_family(pipe) -> Family:
    """"sdxl" or "sd" for a pipeline LEDITS++ can run on; a one-line InputError naming what is missing otherwise."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None or (
        getattr(getattr(getattr(pipe, "unet", None), "config", None), "addition_embed_type", None) == "text_time"
    )
    needed = ["unet", "vae", "scheduler"] + (["text_encoder_2", "tokenizer_2"] if sdxl else ["text_encoder", "tokenizer"])
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    name = type(pipe).__name__
    if missing:
        raise InputError(
            f"{name} lacks {', '.join(missing)}, which LEDITS++ needs: use a Stable Diffusion 1.x/2.x or SDXL checkpoint"
        )
    if not callable(getattr(pipe, "encode_prompt", None)) or not hasattr(pipe, "image_processor"):
        raise InputError(f"{name} is not a text-to-image Stable Diffusion pipeline (no encode_prompt/image_processor)")
    if getattr(pipe.unet.config, "cross_attention_dim", None) is None:
        raise InputError(f"the UNet of {name} has no cross-attention: LEDITS++ needs a text-conditioned UNet")
    if not hasattr(pipe.vae, "encode"):
        raise InputError(f"the VAE of {name} cannot encode images: LEDITS++ needs an autoencoder with an encoder")
    ac = getattr(pipe.scheduler, "alphas_cumprod", None)
    if not isinstance(ac, torch.Tensor) or ac.ndim != 1:
        raise InputError(
            f"the scheduler {type(pipe.scheduler).__name__} has no DDPM noise schedule (alphas_cumprod) to invert with"
        )
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise InputError(f"LEDITS++ cannot invert a model predicting {prediction!r}")
    return "sdxl" if sdxl else "sd"


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: 4 latent cells (32 px on SD), so the attention maps tile the latents."""
    return int(pipe.vae_scale_factor) * ATTENTION_FACTOR


def _device(pipe) -> torch.device:
    return pipe._execution_device


def _work_dtype(pipe) -> torch.dtype:
    """Latents, noise maps and solver steps: float32 at least, even for a half-precision UNet."""
    return torch.promote_types(pipe.unet.dtype, torch.float32)


def _vae_dtype(pipe) -> torch.dtype:
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return vae.dtype


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


def encode_images(pipe, image, height: int | None = None, width: int | None = None, resize_mode: str = "default"):
    """The input as VAE latents (the latent distribution's mode, scaled) and as the resized PIL images encoded."""
    pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode=resize_mode)
    h, w = pixels.shape[-2:]
    multiple = size_multiple(pipe)
    if h % multiple or w % multiple:
        raise InputError(
            f"image size {w}x{h} is not a multiple of {multiple}: pass height and width (multiples of {multiple})"
        )
    resized = pipe.image_processor.postprocess(pixels, output_type="pil")
    with _VaeIn(pipe) as vae:
        latents = vae.encode(pixels.to(device=_device(pipe), dtype=vae.dtype)).latent_dist.mode()
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    x0 = (latents.to(_work_dtype(pipe)) - shift) * pipe.vae.config.scaling_factor
    return x0, resized


def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Latents → images in `output_type` ("pil", "np", "pt" or "latent")."""
    if output_type == "latent":
        return latents
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    with _VaeIn(pipe) as vae:
        image = vae.decode((latents / pipe.vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


@dataclass
class _Text:
    """Text conditioning for one run: the unconditional row, optional extra rows, their pooled embeddings (SDXL)."""

    uncond: torch.Tensor  # (1, tokens, dim)
    rows: torch.Tensor | None  # (n, tokens, dim)
    uncond_pooled: torch.Tensor | None = None
    rows_pooled: torch.Tensor | None = None


def _encode(pipe, family: Family, texts: Sequence[str], negative_prompt: str | None) -> _Text:
    """Encode `texts` (possibly none) and the unconditional text with the pipeline's own ``encode_prompt``."""
    device = _device(pipe)
    prompts = list(texts) or [""]
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    out = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative
    )
    dtype = pipe.unet.dtype
    if family == "sdxl":
        embeds, neg, pooled, neg_pooled = out
        return _Text(
            neg[:1].to(dtype),
            embeds.to(dtype) if texts else None,
            neg_pooled[:1].to(dtype),
            pooled.to(dtype) if texts else None,
        )
    embeds, neg = out[0], out[1]
    return _Text(neg[:1].to(dtype), embeds.to(dtype) if texts else None)


def _time_ids(size: tuple[int, int], batch: int, dtype, device) -> torch.Tensor:
    """SDXL's size conditioning: original size, crop (0, 0) and target size, as (height, width)."""
    h, w = size
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).expand(batch, -1)


def _unet(pipe, x: torch.Tensor, t: int, embeds: torch.Tensor, pooled, size, chunk: int | None, before_chunk=None):
    """The UNet's output for rows `x` (each with its own text row), evaluated `chunk` rows at a time."""
    dtype = pipe.unet.dtype
    rows = x.shape[0]
    chunk = rows if not chunk or chunk <= 0 else chunk
    timestep = torch.tensor(t, dtype=torch.int64, device=x.device)
    outs = []
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled[start:end],
                "time_ids": _time_ids(size, end - start, pooled.dtype, x.device),
            }
        if before_chunk is not None:
            before_chunk(start)
        out = pipe.unet(
            x[start:end].to(dtype), timestep, encoder_hidden_states=embeds[start:end], return_dict=False, **kwargs
        )[0]
        outs.append(out.to(x.dtype))
    return torch.cat(outs)


# -- cross-attention maps --------------------------------------------------------------------------


def _cross_attention_layers(unet) -> dict[int, list]:
    """The UNet's cross-attention modules in its down and up blocks, by their resolution factor (1, 2, 4, …).

    The mid block is left out, as in LEDITS++.
    """
    from diffusers.models.attention_processor import Attention

    n_up = len(getattr(unet, "up_blocks", []))
    layers: dict[int, list] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or name.split(".")[-1] != "attn2":
            continue
        if not getattr(module, "is_cross_attention", False):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            factor = 2 ** int(parts[1])
        elif parts[0] == "up_blocks":
            factor = 2 ** (n_up - 1 - int(parts[1]))
        else:
            continue
        layers.setdefault(factor, []).append(module)
    return layers


def attention_factor(unet) -> int:
    """The resolution factor the masks read attention at: 4 (LEDITS++'s), or the nearest one the UNet has."""
    factors = sorted(_cross_attention_layers(unet))
    if not factors:
        raise InputError("the UNet has no cross-attention layers in its down/up blocks: use masking='noise'")
    return min(factors, key=lambda f: (abs(math.log2(f) - math.log2(ATTENTION_FACTOR)), -f))


class _AttentionCapture:
    """While active, every UNet call sums the concept rows' cross-attention probabilities over the heads
    of the layers at one resolution; :meth:`maps` averages them per concept."""

    def __init__(self, unet, factor: int, latent_spatial: Sequence[int], first_row: int, n_rows: int):
        self.layers = _cross_attention_layers(unet)[factor]
        self.spatial = [math.ceil(s / factor) for s in latent_spatial]
        self.queries = math.prod(self.spatial)
        self.first_row, self.n_rows = first_row, n_rows
        self.total_heads = sum(m.heads for m in self.layers)
        self.offset = 0
        self.sums: torch.Tensor | None = None
        self.enabled = False
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start(self, enabled: bool) -> None:
        self.enabled, self.sums, self.offset = enabled, None, 0

    def set_offset(self, offset: int) -> None:
        self.offset = offset

    def _hook(self, module, args, kwargs):
        if not self.enabled:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is None or hidden.ndim != 3 or hidden.shape[1] != self.queries:
            return
        lo = max(self.first_row - self.offset, 0)
        hi = min(self.first_row + self.n_rows - self.offset, hidden.shape[0])
        if lo >= hi:
            return
        context = context[lo:hi]
        if module.norm_cross:
            context = module.norm_encoder_hidden_states(context)
        query = module.head_to_batch_dim(module.to_q(hidden[lo:hi]))
        key = module.head_to_batch_dim(module.to_k(context))
        probs = module.get_attention_scores(query, key, None)
        probs = probs.reshape(hi - lo, module.heads, *probs.shape[1:]).sum(dim=1)
        if self.sums is None:
            dtype = torch.promote_types(probs.dtype, torch.float32)
            self.sums = torch.zeros(self.n_rows, *probs.shape[1:], dtype=dtype, device=probs.device)
        start = self.offset + lo - self.first_row
        self.sums[start : start + (hi - lo)] += probs.to(self.sums.dtype)

    def maps(self, batch: int, token_slices: Sequence[slice]) -> list[torch.Tensor]:
        """Per concept, its map (batch, *spatial): the head- and layer-averaged attention, summed over its tokens."""
        if self.sums is None:
            raise RuntimeError("no cross-attention was captured during the UNet call")
        mean = self.sums / self.total_heads
        out = []
        for c, tokens in enumerate(token_slices):
            rows = mean[c * batch : (c + 1) * batch, :, tokens].sum(dim=-1)
            out.append(rows.reshape(batch, *self.spatial))
        return out


def _token_slices(pipe, family: Family, guidance: LEditsGuidance, tokens: int) -> list[slice]:
    """Per concept, the token positions whose attention makes its map (position 0 is the start token)."""
    if guidance.attention_tokens == "all":
        return [slice(1, tokens - 1)] * len(guidance.concepts)
    tokenizer = getattr(pipe, "tokenizer_2", None) if family == "sdxl" else None
    tokenizer = tokenizer or pipe.tokenizer
    slices = []
    for concept in guidance.concepts:
        if not isinstance(concept, str):
            raise TypeError("attention_tokens='concept' needs concepts given as text")
        ids = tokenizer(concept, truncation=True, max_length=tokens).input_ids
        slices.append(slice(1, max(len(ids) - 1, 2)))
    return slices


# -- inversion and edit ---------------------------------------------------------------------------


def _schedule(pipe, num_inversion_steps: int, skip: float, final_sigma: str) -> tuple[list[int], torch.Tensor]:
    config = pipe.scheduler.config
    timesteps = inversion_timesteps(
        int(config.num_train_timesteps), num_inversion_steps, skip, int(getattr(config, "steps_offset", 0) or 0)
    )
    all_sigmas = sigmas_from_alphas_cumprod(pipe.scheduler.alphas_cumprod.detach().cpu().to(torch.float64))
    if final_sigma == "min":
        last = all_sigmas[0]
    elif final_sigma == "zero":
        last = torch.zeros((), dtype=torch.float64)
    else:
        raise ValueError(f"final_sigma must be 'min' or 'zero', got {final_sigma!r}")
    sigmas = torch.stack([all_sigmas[t] for t in timesteps] + [last])
    return timesteps, sigmas


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

    `num_inversion_steps` (default 30 on SD, 50 on SDXL) are the steps the edit will take;
    `skip` drops the noisiest fraction of the schedule. With a `source_prompt`, the inversion's
    noise estimates use classifier-free guidance at `source_guidance_scale`, as in the reference.
    `generator` draws the auxiliary sequence's noise (one per image for a batch).
    """
    family = pipeline_family(pipe)
    steps = DEFAULT_STEPS[family] if num_inversion_steps is None else int(num_inversion_steps)
    if steps < 1:
        raise InputError(f"num_inversion_steps must be positive, got {steps}")
    if not 0.0 <= skip < 1.0:
        raise InputError(f"skip must be in [0, 1), got {skip}")
    from diffusers.utils.torch_utils import randn_tensor

    device = _device(pipe)
    x0, resized = encode_images(pipe, image, height=height, width=width, resize_mode=resize_mode)
    batch = x0.shape[0]
    size = (resized[0].height, resized[0].width)
    timesteps, sigmas = _schedule(pipe, steps, skip, final_sigma)
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    cfg = bool(source_prompt) and source_guidance_scale > 1.0
    text = _encode(pipe, family, [source_prompt] if cfg else [], negative_prompt)
    embeds = text.uncond.expand(batch, -1, -1)
    pooled = None if text.uncond_pooled is None else text.uncond_pooled.expand(batch, -1)
    if cfg:
        embeds = torch.cat([embeds, text.rows.expand(batch, -1, -1)])
        pooled = None if pooled is None else torch.cat([pooled, text.rows_pooled.expand(batch, -1)])

    # The auxiliary sequence (edit-friendly: independent noise per step), drawn from the least noisy step up.
    xs: list[torch.Tensor | None] = [None] * (steps + 1)
    for i in reversed(range(steps)):
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        xs[i] = noised(x0, noise, sigmas[i].to(device))
    xs[steps] = x0
    zs = torch.zeros(steps, *x0.shape, dtype=x0.dtype, device=device)
    prev = None
    for i, t in enumerate(timesteps):
        x = xs[i]
        rows = torch.cat([x, x]) if cfg else x
        out = _unet(pipe, rows, t, embeds, pooled, size, unet_batch_size)
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + source_guidance_scale * (cond - uncond)
        sigma, sigma_next = sigmas[i].to(device), sigmas[i + 1].to(device)
        x0_pred = denoised(x, out, sigma, prediction)
        mean = sde_dpmpp_mean(x, x0_pred, sigma, sigma_next, *((prev, sigmas[i - 1].to(device)) if prev is not None else ()))
        scale = sde_dpmpp_noise_scale(sigma, sigma_next)
        zs[i] = noise_map(xs[i + 1], mean, scale)
        xs[i + 1] = sde_dpmpp_step(mean, scale, zs[i])  # the step as the edit will take it: no error accumulates
        prev = x0_pred
        if progress is not None:
            progress("invert", i + 1, steps)
    settings = {
        "method": "LEDITS++ (Brack et al., CVPR 2024)",
        "family": family,
        "pipeline": type(pipe).__name__,
        "num_inversion_steps": steps,
        "skip": float(skip),
        "timesteps": list(timesteps),
        "solver": "SDE-DPM-Solver++(2M), midpoint, first order on the first step",
        "final_sigma": final_sigma,
        "prediction_type": prediction,
        "source_prompt": source_prompt if cfg else "",
        "source_guidance_scale": float(source_guidance_scale) if cfg else None,
        "negative_prompt": negative_prompt,
        "height": size[0],
        "width": size[1],
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "work_dtype": str(x0.dtype).removeprefix("torch."),
    }
    return LEditsPPInversion(
        x0=x0,
        xT=xs[0],
        noise_maps=zs,
        timesteps=list(timesteps),
        sigmas=sigmas,
        images=resized,
        family=family,
        negative_prompt=negative_prompt,
        settings=settings,
    )


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

    `zero_noise_steps` (default 0 on SD, 3 on SDXL, as diffusers) sets the last steps' noise maps to
    zero. `unet_batch_size` caps the rows per UNet call (1 + concepts per image otherwise).
    """
    family = pipeline_family(pipe)
    if family != inversion.family:
        raise InputError(f"this inversion was made with an {inversion.family} pipeline, not an {family} one")
    device = _device(pipe)
    concepts = [] if guidance is None else list(guidance.concepts)
    texts = [c for c in concepts if isinstance(c, str)]
    if texts and len(texts) != len(concepts):
        raise ValueError("give edit concepts all as text or all as embeddings")
    text = _encode(pipe, family, texts, inversion.negative_prompt)
    batch = inversion.xT.shape[0]
    n = len(concepts)
    concept_rows = text.rows
    if concepts and not texts:
        if family == "sdxl":
            raise ValueError("SDXL needs pooled text embeddings: give the edit concepts as text")
        concept_rows = torch.stack([c.to(device=device, dtype=pipe.unet.dtype) for c in concepts])
    embeds = [text.uncond.expand(batch, -1, -1)]
    pooled = None if text.uncond_pooled is None else [text.uncond_pooled.expand(batch, -1)]
    for c in range(n):
        embeds.append(concept_rows[c : c + 1].expand(batch, -1, -1))
        if pooled is not None:
            pooled.append(text.rows_pooled[c : c + 1].expand(batch, -1))
    embeds = torch.cat(embeds)
    pooled = None if pooled is None else torch.cat(pooled)
    size = (inversion.images[0].height, inversion.images[0].width)

    steps = len(inversion.timesteps)
    zero = DEFAULT_ZERO_NOISE_STEPS[family] if zero_noise_steps is None else int(zero_noise_steps)
    zs = inversion.noise_maps.clone()
    if zero > 0:
        zs[-zero:] = 0
    intersect_from = None
    capture = None
    factor = None
    token_slices: list[slice] = []
    if guidance is not None:
        intersect_from = guidance.intersect_from_timestep
        if intersect_from == "auto":
            intersect_from = DEFAULT_INTERSECT_FROM[family]
        if guidance.uses_attention:
            factor = attention_factor(pipe.unet)
            capture = _AttentionCapture(pipe.unet, factor, inversion.xT.shape[2:], batch, n * batch)
            token_slices = _token_slices(pipe, family, guidance, embeds.shape[1])
    latent_spatial = inversion.xT.shape[2:]
    step_masks = torch.zeros(steps, n, batch, *latent_spatial, dtype=torch.bool)
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    sigmas = inversion.sigmas
    x = inversion.xT
    prev = None
    try:
        for i, t in enumerate(inversion.timesteps):
            active = guidance.active(i) if guidance is not None else []
            rows = torch.cat([x] * (1 + n)) if n else x
            if capture is not None:
                capture.start(any(active))
            out = _unet(
                pipe, rows, t, embeds, pooled, size, unet_batch_size, capture.set_offset if capture else None
            )
            uncond = out[:batch]
            if n and any(active):
                attention = capture.maps(batch, token_slices) if capture is not None else None
                gamma, masks = guidance.apply(
                    uncond, list(out[batch:].split(batch)), i, t, attention, intersect_from_timestep=intersect_from
                )
                model_out = uncond + gamma
                for c, mask in enumerate(masks):
                    if mask is not None:
                        step_masks[i, c] = (mask[:, 0] > 0).cpu()
            else:
                model_out = uncond
            sigma, sigma_next = sigmas[i].to(device), sigmas[i + 1].to(device)
            x0_pred = denoised(x, model_out, sigma, prediction)
            extra = (prev, sigmas[i - 1].to(device)) if prev is not None else ()
            mean = sde_dpmpp_mean(x, x0_pred, sigma, sigma_next, *extra)
            x = sde_dpmpp_step(mean, sde_dpmpp_noise_scale(sigma, sigma_next), zs[i])
            prev = x0_pred
            if progress is not None:
                progress("edit", i + 1, steps)
    finally:
        if capture is not None:
            capture.close()

    images = decode_latents(pipe, x, output_type)
    concept_masks = step_masks.any(dim=0).transpose(0, 1)  # (batch, concepts, *latent)
    union = concept_masks.any(dim=1) if n else torch.zeros(batch, *latent_spatial, dtype=torch.bool)
    coverage = [float(m.float().mean()) for m in union]
    mask_out = _mask_images(union, size, "pil" if output_type == "pil" else "np")
    settings = dict(inversion.settings)
    settings.update(
        {
            "guidance": None if guidance is None else guidance.describe(),
            "intersect_from_timestep": intersect_from,
            "attention_resolution_factor": factor,
            "zero_noise_steps": zero,
            "deviations_from_diffusers": _deviations(settings, family),
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


def _deviations(settings: dict, family: Family) -> list[str]:
    notes = ["inversion and edit use their own SDE-DPM-Solver++(2M) steps, not the pipeline's scheduler"]
    if settings.get("final_sigma") == "min":
        notes.append("the last step ends at the smallest noise level (LEDITS++'s code), not at 0: exact reconstruction")
    if family == "sdxl" and settings.get("height") != settings.get("width"):
        notes.append("SDXL size conditioning is (height, width); diffusers' LEDITS++ passes (width, height)")
    if family == "sd" and settings.get("source_prompt"):
        notes.append("the source prompt guides the inversion towards it; diffusers' SD LEDITS++ swaps its embeddings")
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
    intersect = None if guidance is None else guidance.intersect_from_timestep
    if intersect == "auto":
        intersect = DEFAULT_INTERSECT_FROM[family]
    uses_attention = guidance is not None and guidance.uses_attention
    settings = {
        "method": "LEDITS++ (Brack et al., CVPR 2024)",
        "family": family,
        "pipeline": type(pipe).__name__,
        "num_inversion_steps": DEFAULT_STEPS[family] if steps is None else int(steps),
        "solver": "SDE-DPM-Solver++(2M), midpoint, first order on the first step",
        "final_sigma": final_sigma,
        "zero_noise_steps": DEFAULT_ZERO_NOISE_STEPS[family],
        "intersect_from_timestep": intersect,
        "attention_resolution_factor": attention_factor(pipe.unet) if uses_attention else None,
        "prediction_type": getattr(pipe.scheduler.config, "prediction_type", "epsilon"),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
    }
    settings["deviations_from_diffusers"] = _deviations(settings, family)
    return settings
