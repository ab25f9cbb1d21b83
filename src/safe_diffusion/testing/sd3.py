"""A random-weight Stable Diffusion 3 checkpoint (two CLIP encoders, T5 optional), built offline."""

from __future__ import annotations

from pathlib import Path

from .parts import char_t5_tokenizer, clip_encoder, kl_vae, seed_all, t5_encoder
from .stable_diffusion import byte_level_tokenizer


def build_sd3_checkpoint(path: str | Path, seed: int = 0, t5: bool = False) -> Path:
    """Save a tiny ``StableDiffusion3Pipeline`` at `path` (32x32 images at the default size).

    Without `t5` the third text encoder is absent, as with ``text_encoder_3=None`` on a real
    checkpoint: the T5 tokens are zeros. Pass ``max_sequence_length`` small (e.g. 8) in calls.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    seed_all(seed)
    tokenizer = byte_level_tokenizer()
    ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # the two CLIPs' 32 + 32 features, and T5's d_model
        pooled_projection_dim=64,
        out_channels=4,
    )
    components = dict(
        transformer=transformer,
        vae=kl_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_encoder(len(tokenizer), projection=True, **ids),
        text_encoder_2=clip_encoder(len(tokenizer), projection=True, **ids),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    if t5:
        t5_tokenizer = char_t5_tokenizer()
        components.update(text_encoder_3=t5_encoder(len(t5_tokenizer), d_model=64), tokenizer_3=t5_tokenizer)
    StableDiffusion3Pipeline(**components).save_pretrained(path)
    return path
