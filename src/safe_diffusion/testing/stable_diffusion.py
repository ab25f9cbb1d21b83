"""Random-weight Stable Diffusion 1.x and SDXL checkpoints and a random CLIP, built fully offline.

They are saved with ``save_pretrained`` and load back through the same ``from_pretrained`` path
a real checkpoint takes, so tests, the demo and the benchmarks exercise the real loading code.
Their images are noise: they test plumbing and numerics, not image quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..common.provenance import mark_random_weights

#: Sizes: "tiny" for unit tests, "small" for the demo and end-to-end tests, "bench" for a UNet
#: large enough to dominate a step's time, as in a real model.
SIZES = {
    "tiny": dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32, text_layers=2
    ),
    "small": dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, cross_attention_dim=64, text_layers=2
    ),
    "bench": dict(
        block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=16, cross_attention_dim=256, text_layers=4
    ),
    # Three levels with cross-attention at 1/2 and 1/4 of the latent size, like SD's own UNet: LEDITS++
    # reads its masks at 1/4 (diffusers' LEDITS++ pipelines need attention there); 64x64 images.
    "deep": dict(
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        sample_size=32,
        cross_attention_dim=32,
        text_layers=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def byte_level_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every character is a token."""
    import tempfile

    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=model_max_length
        )


def _tiny_vae(sample_size: int):
    """A random two-level VAE (downscale 2) for the test checkpoints."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    )


def build_checkpoint(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build a random-weight SD 1.x-style checkpoint (UNet, VAE, CLIP text encoder, tokenizer, PNDM) at `path`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose one of: {', '.join(SIZES)}")
    cfg = SIZES[size]
    path = Path(path)
    torch.manual_seed(seed)
    channels = cfg["block_out_channels"]
    levels = len(channels)
    unet = UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=cfg["layers_per_block"],
        sample_size=cfg["sample_size"],
        in_channels=4,
        out_channels=4,
        down_block_types=cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)),
        up_block_types=cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)),
        cross_attention_dim=cfg["cross_attention_dim"],
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae(cfg["sample_size"] * 2)
    tokenizer = byte_level_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg["cross_attention_dim"],
            intermediate_size=cfg["cross_attention_dim"] * 2,
            num_hidden_layers=cfg["text_layers"],
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    mark_random_weights(path, "safe_diffusion.testing.build_checkpoint", size=size, seed=seed)
    return path


def build_sdxl_checkpoint(path: str | Path, seed: int = 0, deep: bool = False) -> Path:
    """Build a tiny random-weight SDXL checkpoint: two CLIP text encoders (the second with a projection,
    giving the pooled embeddings), a UNet with ``text_time`` added conditioning, Euler scheduler.

    Sizes follow diffusers' own tiny SDXL test configuration; images are 32x32 at the default size.
    `deep`: three levels like SDXL's own (cross-attention at 1/2 and 1/4 of the latent size, where
    LEDITS++ reads its masks); images are 64x64 at the default size.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    levels = 3 if deep else 2
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64) if deep else (32, 64),
        layers_per_block=1,
        sample_size=32 if deep else 16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=(2, 4, 8) if deep else (2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1,) * levels,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids × 8 + pooled text (projection_dim 32)
        cross_attention_dim=64,  # the two encoders' hidden states, 32 + 32, concatenated
        norm_num_groups=32,
    )
    vae = _tiny_vae(64 if deep else 32)
    tokenizer = byte_level_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    mark_random_weights(path, "safe_diffusion.testing.build_sdxl_checkpoint", seed=seed, deep=deep)
    return path


#: CLIP sizes: ``tiny`` for tests (32x32 inputs), ``vit-l14`` with openai/clip-vit-large-patch14's config sizes
#: (random weights: for timing the real architecture).
CLIP_SIZES = {
    "tiny": dict(text=(32, 37, 2, 4), vision=(32, 37, 2, 4), image_size=32, patch_size=8),
    "vit-l14": dict(text=(768, 3072, 12, 12), vision=(1024, 4096, 24, 16), image_size=224, patch_size=14),
}


def build_clip(path: str | Path, projection_dim: int = 768, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random-weight CLIP (``CLIPModel``, byte-level ``CLIPTokenizer``, ``CLIPImageProcessor``) in one
    folder, loadable with ``from_pretrained`` like ``openai/clip-vit-large-patch14`` (`size`: see CLIP_SIZES)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    dims = CLIP_SIZES[size]
    (th, ti, tl, ta), (vh, vi, vl, va) = dims["text"], dims["vision"]
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=th,
        intermediate_size=ti,
        num_hidden_layers=tl,
        num_attention_heads=ta,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=vh,
        intermediate_size=vi,
        num_hidden_layers=vl,
        num_attention_heads=va,
        image_size=dims["image_size"],
        patch_size=dims["patch_size"],
        projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    if size == "tiny":
        model = CLIPModel(config)
    else:  # real sizes: no default initialisation (minutes on a CPU), weights filled once
        from .realsize import build_model

        model = build_model(lambda: CLIPModel(config), torch.float32, "cpu", seed)
    side = dims["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    mark_random_weights(path, "safe_diffusion.testing.build_clip", size=size, seed=seed)
    return path
