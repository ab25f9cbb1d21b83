"""A random-weight PixArt-Σ checkpoint (T5 text encoder, learned-σ transformer), built offline."""

from __future__ import annotations

from pathlib import Path

from .parts import char_t5_tokenizer, kl_vae, seed_all, t5_encoder


def build_pixart_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``PixArtSigmaPipeline`` at `path` (32x32 images); pass a small ``max_sequence_length`` in calls."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    path = Path(path)
    seed_all(seed)
    tokenizer = char_t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,  # ε and the learned variance
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), d_model=32),
        vae=kl_vae(4),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(path)
    return path
