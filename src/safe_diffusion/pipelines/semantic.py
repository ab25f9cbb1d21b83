"""Semantic guidance as a drop-in for diffusers' deprecated ``SemanticStableDiffusionPipeline``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from ..engine import guide, guided_call
from ..guidance.terms import SemanticGuidance

logger = logging.getLogger(__name__)


@dataclass
class SemanticStableDiffusionPipelineOutput(BaseOutput):
    """Images and the safety checker's verdicts (None without a checker)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None


class SemanticStableDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion with semantic guidance, SEGA (Brack et al., NeurIPS 2023).

    Takes the arguments of diffusers' ``SemanticStableDiffusionPipeline``; every ``edit_*`` argument
    is one value for all concepts or a list with one value per concept.
    """

    _safe_diffusion_native = True  # our own drop-in: guide() serves it, its editing_prompt is ours

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker,
        feature_extractor,
        requires_safety_checker: bool = True,
        image_encoder=None,
    ):
        """As diffusers' ``SemanticStableDiffusionPipeline.__init__``: the scheduler and the UNet are registered
        as given. ``StableDiffusionPipeline.__init__`` would rewrite a scheduler's ``steps_offset`` to 1 and
        ``clip_sample`` to False, which moves the timesteps of a scheduler built in code (``DDIMScheduler()``
        denoises at 501 … 1 instead of 500 … 0) and changes every image. ``image_encoder`` (None unless an
        IP-Adapter is loaded) is the one component the reference lacks."""
        DiffusionPipeline.__init__(self)
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "You have disabled the safety checker for %s by passing `safety_checker=None`; the Stable Diffusion "
                "license asks you not to expose unfiltered results in public services.",
                type(self),
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                f"{type(self).__name__} needs a feature extractor to run its safety checker; pass one, or "
                "safety_checker=None"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self._is_unet_config_sample_size_int = unet is not None and isinstance(unet.config.sample_size, int)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        editing_prompt: str | list[str] | None = None,
        editing_prompt_embeddings: torch.Tensor | None = None,
        reverse_editing_direction: bool | list[bool] = False,
        edit_guidance_scale: float | list[float] = 5,
        edit_warmup_steps: int | list[int] = 10,
        edit_cooldown_steps: int | list[int] | None = None,
        edit_threshold: float | list[float] = 0.9,
        edit_momentum_scale: float = 0.1,
        edit_mom_beta: float = 0.4,
        edit_weights: list[float] | None = None,
        **kwargs,
    ):
        """Generate; arguments as in ``StableDiffusionPipeline`` plus the reference's ``editing_prompt`` / ``edit_*``."""
        if editing_prompt:
            concepts = [editing_prompt] if isinstance(editing_prompt, str) else list(editing_prompt)
        elif editing_prompt_embeddings is not None:
            concepts = list(editing_prompt_embeddings)
        else:
            concepts = []
        terms = []
        if concepts:
            terms.append(
                SemanticGuidance(
                    concepts,
                    reverse=reverse_editing_direction,
                    scale=edit_guidance_scale,
                    threshold=edit_threshold,
                    warmup_steps=edit_warmup_steps,
                    cooldown_steps=edit_cooldown_steps,
                    weights=edit_weights or None,
                    momentum_scale=edit_momentum_scale,
                    mom_beta=edit_mom_beta,
                )
            )
        if callback is not None:
            kwargs.update(callback=callback, callback_steps=callback_steps)
        with guide(self, *terms), guided_call(self, guidance_scale=guidance_scale, **kwargs):
            out = super().__call__(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                output_type=output_type,
                return_dict=True,
                **kwargs,
            )
        result = SemanticStableDiffusionPipelineOutput(
            images=out.images, nsfw_content_detected=out.nsfw_content_detected
        )
        return result if return_dict else result.to_tuple()
