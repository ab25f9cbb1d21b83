"""Safe Latent Diffusion as a drop-in for diffusers' deprecated ``StableDiffusionPipelineSafe``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from ..engine import guide, guided_call
from ..guidance.sld import DEFAULT_SAFETY_CONCEPT
from ..guidance.terms import SafetyGuidance


@dataclass
class SafeStableDiffusionPipelineOutput(BaseOutput):
    """Images, the safety checker's verdicts (None without a checker), the originals it blacked out, and the
    safety concept SLD applied (None when safety guidance was off)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    unsafe_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    applied_safety_concept: str | None


class SafeStableDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion with Safe Latent Diffusion (Schramowski et al., CVPR 2023).

    Loads like any ``StableDiffusionPipeline`` (a hub id or a local folder, SD 1.x or 2.x, with or
    without a safety checker) and takes the arguments of diffusers' ``StableDiffusionPipelineSafe``:
    ``pipe(prompt, **SafetyConfig.STRONG)``. Safety guidance is on unless ``sld_guidance_scale <= 1``
    or classifier-free guidance is off, exactly as in the reference.
    """

    _safety_concept: str = DEFAULT_SAFETY_CONCEPT
    _safe_diffusion_native = True  # our own drop-in: guide() serves it

    @property
    def safety_concept(self) -> str:
        """The text SLD steers away from."""
        return self._safety_concept

    @safety_concept.setter
    def safety_concept(self, concept: str) -> None:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError("the safety concept must be a non-empty text")
        self._safety_concept = concept

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
        ip_adapter_image=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        sld_guidance_scale: float = 1000,
        sld_warmup_steps: int = 10,
        sld_threshold: float = 0.01,
        sld_momentum_scale: float = 0.3,
        sld_mom_beta: float = 0.4,
        **kwargs,
    ):
        """Generate; arguments as in ``StableDiffusionPipeline`` plus the ``sld_*`` ones (see :class:`SafetyConfig`)."""
        enabled = sld_guidance_scale > 1.0 and guidance_scale > 1.0
        terms = []
        if enabled:
            terms.append(
                SafetyGuidance(
                    concept=self.safety_concept,
                    scale=sld_guidance_scale,
                    warmup_steps=sld_warmup_steps,
                    threshold=sld_threshold,
                    momentum_scale=sld_momentum_scale,
                    mom_beta=sld_mom_beta,
                )
            )
        if callback is not None:
            kwargs.update(callback=callback, callback_steps=callback_steps)
        self._flagged = None
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
                ip_adapter_image=ip_adapter_image,
                output_type=output_type,
                return_dict=True,
                **kwargs,
            )
        unsafe = None
        if self._flagged is not None and output_type != "latent":
            unsafe = self.image_processor.postprocess(self._flagged, output_type=output_type)
        self._flagged = None
        result = SafeStableDiffusionPipelineOutput(
            images=out.images,
            nsfw_content_detected=out.nsfw_content_detected,
            unsafe_images=unsafe,
            applied_safety_concept=self.safety_concept if enabled else None,
        )
        return result if return_dict else result.to_tuple()

    def run_safety_checker(self, image, device, dtype):
        """As in Stable Diffusion, but keep the originals the checker blacks out for ``unsafe_images``."""
        # The checker blacks out flagged images in place, so keep a copy of what it saw.
        original = image.clone() if self.safety_checker is not None and torch.is_tensor(image) else image
        image, has_nsfw = super().run_safety_checker(image, device, dtype)
        if has_nsfw is not None and any(has_nsfw) and original is not image:
            self._flagged = original[[i for i, flagged in enumerate(has_nsfw) if flagged]]
        return image, has_nsfw
