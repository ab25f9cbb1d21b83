"""A random-weight Wan 2.1 text-to-video checkpoint (UMT5 text encoder, 3-D transformer), built offline."""

from __future__ import annotations

from pathlib import Path

from .parts import char_t5_tokenizer, seed_all, t5_encoder


def build_wan_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``WanPipeline`` at `path`; sizes follow diffusers' own tiny test model.

    Call it with e.g. ``height=16, width=16, num_frames=5, max_sequence_length=16``.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    path = Path(path)
    seed_all(seed)
    tokenizer = char_t5_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), d_model=32, umt5=True),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return path
