"""A random-weight FLUX.1 checkpoint (CLIP + T5, no guidance embedding: true CFG), built offline."""

from __future__ import annotations

from pathlib import Path

from .parts import char_t5_tokenizer, clip_encoder, kl_vae, seed_all, t5_encoder
from .stable_diffusion import byte_level_tokenizer


def build_flux_checkpoint(path: str | Path, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """Save a tiny ``FluxPipeline`` at `path`; ``guidance_embeds=True`` makes it guidance-distilled like FLUX.1-dev.

    Pass ``height=width=32`` and a small ``max_sequence_length`` (e.g. 16) in calls.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    seed_all(seed)
    tokenizer = byte_level_tokenizer()
    t5_tokenizer = char_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    pipe = FluxPipeline(
        transformer=transformer,
        vae=kl_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_encoder(
            len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id
        ),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(len(t5_tokenizer), d_model=32),
        tokenizer_2=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(path)
    return path
