"""Random-weight pipelines at the **real** sizes of published checkpoints, built in memory on any device.

``build_real_pipeline("sd15", dtype=torch.float16, device="cuda")`` returns a ``StableDiffusionPipeline``
with the architecture of runwayml/stable-diffusion-v1-5 (every component's published ``config.json``
values, :data:`REAL_SIZES`), random weights, in the given dtype, on the given device. Random weights at
the real architecture cost the same compute as the real ones, so timings and memory are those a user
would see; the images are noise.

How it stays fast: every model is constructed with its parameters on the meta device (no memory, no
default initialisation), then each parameter is created directly on the target device in its dtype and
filled once with ``uniform_`` of variance 1/fan-in (norm weights 1, biases 0), which keeps activations
finite in float16/bfloat16. Buffers (positional tables, RoPE frequencies) are computed as usual. Parameters
a real ``from_pretrained`` keeps in float32 (diffusers' ``_keep_in_fp32_modules``, transformers' in
float16) are kept in float32 here too. Nothing is written to disk unless ``path`` is given.

Tokenizers are the offline ones this package builds (byte-level CLIP, character-level T5): prompts
tokenize into more tokens than with the real vocabularies, but every pipeline here pads text to its
fixed length (77 for CLIP, ``max_sequence_length`` for T5), so the text encoders cost the same. The
embedding tables keep the real vocabulary sizes.

``tiny=True`` builds the same pipelines with every width and depth shrunk (seconds on a CPU), so code
that uses the real sizes can be tested end to end; :data:`REAL_SIZES` gives each family's native call
(resolution, frames, the arguments that switch classifier-free guidance on).

Over 500 lines because each family's builder spells out its published configuration (seven families, one
function each, every value as the hub's ``config.json`` has it), kept together so one file shows every
real size the benchmarks measure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .parts import char_t5_tokenizer
from .stable_diffusion import byte_level_tokenizer


@dataclass(frozen=True)
class RealSize:
    """One family: the checkpoint whose architecture it copies and the call that runs it at native size."""

    name: str
    checkpoint: str  #: the hub checkpoint whose published configuration the architecture follows
    pipeline: str  #: the diffusers pipeline class
    height: int
    width: int
    call: dict = field(default_factory=dict)  #: arguments that switch classifier-free guidance on, native settings
    gpu_dtype: str = "float16"  #: the dtype the checkpoint is run in on a GPU
    num_frames: int | None = None
    tiny_call: dict = field(default_factory=dict)  #: overrides of `call` (and height/width) for tiny=True

    def native_call(self, tiny: bool = False) -> dict:
        """Keyword arguments of a native-size (or tiny) call: height, width, frames, guidance settings."""
        call = {"height": self.height, "width": self.width, **self.call}
        if self.num_frames is not None:
            call["num_frames"] = self.num_frames
        if tiny:
            call.update(self.tiny_call)
        return call


# -- materialising parameters -------------------------------------------------------------------------


def _meta_init(factory: Callable[[], torch.nn.Module], buffers_too: bool = False) -> torch.nn.Module:
    """`factory()` with every parameter on the meta device and buffers computed as usual (on the CPU), or on
    the meta device too with `buffers_too` (SD3's positional table alone is 0.9 GB to compute)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=buffers_too):
        model = factory()
    if callable(getattr(model, "tie_weights", None)):  # transformers ties at init, but not on the meta device
        model.tie_weights()
    return model


def _keeps_fp32(model: torch.nn.Module, name: str, dtype: torch.dtype) -> bool:
    """Whether ``from_pretrained(..., dtype)`` would leave this parameter in float32."""
    import diffusers

    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    if not keep or dtype == torch.float32:
        return False
    if isinstance(model, diffusers.ModelMixin):  # diffusers: for every dtype
        return any(part in keep for part in name.split("."))
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    parts = name.split(".")
    return (dtype == torch.float16 and any(p in keep for p in parts)) or any(p in strict for p in parts)


def materialize(model: torch.nn.Module, dtype: torch.dtype, device, seed: int = 0) -> torch.nn.Module:
    """Give every meta parameter of `model` storage on `device` in `dtype`, filled cheaply (see module doc).

    Matrices and convolution kernels get ``uniform_(-a, a)`` with variance 1/fan-in; 1-D weights (norms)
    1; biases 0. Shared (tied) parameters stay shared. Float buffers move to `device` and `dtype`.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device if device.type != "meta" else "cpu").manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in made:
                module._parameters[name] = made[id(param)]
                continue
            full = f"{module_name}.{name}" if module_name else name
            dt = torch.float32 if _keeps_fp32(model, full, dtype) else dtype
            tensor = torch.empty(param.shape, dtype=dt, device=device)
            if device.type != "meta":
                with torch.no_grad():
                    _fill(tensor, name, generator)
            new = torch.nn.Parameter(tensor, requires_grad=param.requires_grad)
            made[id(param)] = module._parameters[name] = new
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            if buffer.is_floating_point():
                dt = torch.float32 if _keeps_fp32(model, full, dtype) else dtype
                module._buffers[name] = buffer.to(device=device, dtype=dt)
            else:
                module._buffers[name] = buffer.to(device=device)
    return model


def _fill(tensor: torch.Tensor, name: str, generator: torch.Generator) -> None:
    if tensor.ndim >= 2:
        fan_in = math.prod(tensor.shape[1:])
        bound = math.sqrt(3.0 / max(fan_in, 1))
        tensor.uniform_(-bound, bound, generator=generator)
    elif name.endswith("bias"):
        tensor.zero_()
    else:
        tensor.fill_(1.0)


def build_model(factory: Callable[[], torch.nn.Module], dtype, device, seed: int = 0) -> torch.nn.Module:
    """``factory()`` (a model constructor) built on the meta device and materialised on `device` in `dtype`."""
    model = materialize(_meta_init(factory, buffers_too=torch.device(device).type == "meta"), dtype, device, seed)
    return model.eval()


# -- components ------------------------------------------------------------------------------------------


def _clip_text(tokenizer, *, kind: str, tiny: bool, projection: bool, dtype, device, seed):
    """CLIP ViT-L/14's text tower (``kind="L"``) or OpenCLIP ViT-bigG/14's (``kind="G"``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dims = {  # hidden, intermediate, layers, heads, activation
        "L": (768, 3072, 12, 12, "quick_gelu"),
        "G": (1280, 5120, 32, 20, "gelu"),
    }[kind]
    hidden, intermediate, layers, heads, act = (32, 64, 2, 4, dims[4]) if tiny else dims
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return build_model(lambda: cls(config), dtype, device, seed)


def _t5_xxl(*, umt5: bool, tiny: bool, dtype, device, seed):
    """The encoder of T5 v1.1 XXL (google/t5-v1_1-xxl, as SD3, FLUX and PixArt-Σ ship it) or of UMT5-XXL (Wan)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    d_model, d_ff, layers, heads = (64, 128, 2, 4) if tiny else (4096, 10240, 24, 64)
    config = config_cls(
        vocab_size=256384 if umt5 else 32128,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return build_model(lambda: model_cls(config), dtype, device, seed)


def _kl_vae(
    *,
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None,
    sample_size: int,
    tiny: bool,
    dtype,
    device,
    seed,
    force_upcast: bool = True,
):
    """The KL autoencoder of SD 1.x / SDXL (4 channels) and SD3 / FLUX (16 channels, no quant convs)."""
    from diffusers import AutoencoderKL

    quant = shift_factor is None
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32,
        act_fn="silu",
        latent_channels=latent_channels,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        force_upcast=force_upcast,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )
    return build_model(lambda: AutoencoderKL(**kwargs), dtype, device, seed)


# -- families --------------------------------------------------------------------------------------------


def _sd15(tiny, dtype, device, seed):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_level_tokenizer()
    unet = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    )
    if tiny:
        unet.update(
            block_out_channels=(32, 32),
            layers_per_block=1,
            cross_attention_dim=32,
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    return StableDiffusionPipeline(
        vae=_kl_vae(
            latent_channels=4,
            scaling_factor=0.18215,
            shift_factor=None,
            sample_size=512,
            tiny=tiny,
            dtype=dtype,
            device=device,
            seed=seed + 1,
            force_upcast=True,
        ),
        text_encoder=_clip_text(
            tokenizer, kind="L", tiny=tiny, projection=False, dtype=dtype, device=device, seed=seed + 2
        ),
        tokenizer=tokenizer,
        unet=build_model(lambda: UNet2DConditionModel(**unet), dtype, device, seed),
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(tiny, dtype, device, seed):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = byte_level_tokenizer()
    unet = dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,  # CLIP-L's 768 + bigG's 1280, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's pooled 1280
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if tiny:
        unet.update(
            block_out_channels=(32, 32, 32),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 1),
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            sample_size=8,
        )
    return StableDiffusionXLPipeline(
        vae=_kl_vae(
            latent_channels=4,
            scaling_factor=0.13025,
            shift_factor=None,
            sample_size=1024,
            tiny=tiny,
            dtype=dtype,
            device=device,
            seed=seed + 1,
            force_upcast=True,
        ),
        text_encoder=_clip_text(
            tokenizer, kind="L", tiny=tiny, projection=False, dtype=dtype, device=device, seed=seed + 2
        ),
        text_encoder_2=_clip_text(
            tokenizer, kind="G", tiny=tiny, projection=True, dtype=dtype, device=device, seed=seed + 3
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=build_model(lambda: UNet2DConditionModel(**unet), dtype, device, seed),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            prediction_type="epsilon",
        ),
    )


def _sd35_medium(tiny, dtype, device, seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = byte_level_tokenizer()
    transformer = dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )
    if tiny:
        transformer.update(
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            sample_size=8,
        )
    return StableDiffusion3Pipeline(
        transformer=build_model(lambda: SD3Transformer2DModel(**transformer), dtype, device, seed),
        vae=_kl_vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            sample_size=1024,
            tiny=tiny,
            dtype=dtype,
            device=device,
            seed=seed + 1,
        ),
        text_encoder=_clip_text(
            tokenizer, kind="L", tiny=tiny, projection=True, dtype=dtype, device=device, seed=seed + 2
        ),
        text_encoder_2=_clip_text(
            tokenizer, kind="G", tiny=tiny, projection=True, dtype=dtype, device=device, seed=seed + 3
        ),
        text_encoder_3=_t5_xxl(umt5=False, tiny=tiny, dtype=dtype, device=device, seed=seed + 4),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=char_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def _flux(guidance_embeds: bool):
    def build(tiny, dtype, device, seed):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        tokenizer = byte_level_tokenizer()
        transformer = dict(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(16, 56, 56),
        )
        if tiny:
            transformer.update(
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=64,
                pooled_projection_dim=32,
                axes_dims_rope=(4, 6, 6),
            )
        return FluxPipeline(
            transformer=build_model(lambda: FluxTransformer2DModel(**transformer), dtype, device, seed),
            vae=_kl_vae(
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                sample_size=1024,
                tiny=tiny,
                dtype=dtype,
                device=device,
                seed=seed + 1,
            ),
            text_encoder=_clip_text(
                tokenizer, kind="L", tiny=tiny, projection=False, dtype=dtype, device=device, seed=seed + 2
            ),
            tokenizer=tokenizer,
            text_encoder_2=_t5_xxl(umt5=False, tiny=tiny, dtype=dtype, device=device, seed=seed + 4),
            tokenizer_2=char_t5_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000,
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
            image_encoder=None,
            feature_extractor=None,
        )

    return build


def _pixart_sigma(tiny, dtype, device, seed):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = dict(
        sample_size=128,
        num_layers=28,
        patch_size=2,
        attention_head_dim=72,
        num_attention_heads=16,
        in_channels=4,
        out_channels=8,  # ε and the learned variance
        caption_channels=4096,
        cross_attention_dim=1152,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=2,
        use_additional_conditions=False,
    )
    if tiny:
        transformer.update(
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=64,
            cross_attention_dim=24,
            sample_size=8,
            interpolation_scale=1,
        )
    return PixArtSigmaPipeline(
        tokenizer=char_t5_tokenizer(),
        text_encoder=_t5_xxl(umt5=False, tiny=tiny, dtype=dtype, device=device, seed=seed + 4),
        vae=_kl_vae(
            latent_channels=4,
            scaling_factor=0.13025,
            shift_factor=None,
            sample_size=1024,
            tiny=tiny,
            dtype=dtype,
            device=device,
            seed=seed + 1,
        ),
        transformer=build_model(lambda: PixArtTransformer2DModel(**transformer), dtype, device, seed),
        scheduler=DPMSolverMultistepScheduler(
            beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000
        ),
    )


def _wan_13b(tiny, dtype, device, seed):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    vae = dict(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    if tiny:
        transformer.update(
            num_attention_heads=2, attention_head_dim=12, text_dim=64, ffn_dim=32, num_layers=2, rope_max_seq_len=32
        )
        vae.update(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    return WanPipeline(
        tokenizer=char_t5_tokenizer(),
        text_encoder=_t5_xxl(umt5=True, tiny=tiny, dtype=dtype, device=device, seed=seed + 4),
        # Wan's VAE runs in float32 in diffusers' examples (the transformer in bfloat16)
        vae=build_model(lambda: AutoencoderKLWan(**vae), torch.float32, device, seed + 1),
        transformer=build_model(lambda: WanTransformer3DModel(**transformer), dtype, device, seed),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        ),
    )


_BUILDERS: dict[str, Callable] = {
    "sd15": _sd15,
    "sdxl": _sdxl,
    "sd35-medium": _sd35_medium,
    "flux-dev": _flux(guidance_embeds=True),
    "flux-dev-no-guidance-embeds": _flux(guidance_embeds=False),
    "pixart-sigma": _pixart_sigma,
    "wan2.1-1.3b": _wan_13b,
}

_TINY = dict(height=64, width=64)
_T5_TINY = dict(_TINY, max_sequence_length=16)

#: Every family built at real size, with its native call. Sources of the configurations: each checkpoint's
#: ``*/config.json`` on the Hugging Face hub (architectures only; no weights are read).
REAL_SIZES: dict[str, RealSize] = {
    r.name: r
    for r in (
        RealSize(
            "sd15",
            "runwayml/stable-diffusion-v1-5",
            "StableDiffusionPipeline",
            512,
            512,
            dict(guidance_scale=7.5),
            "float16",
            tiny_call=_TINY,
        ),
        RealSize(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "StableDiffusionXLPipeline",
            1024,
            1024,
            dict(guidance_scale=5.0),
            "float16",
            tiny_call=_TINY,
        ),
        RealSize(
            "sd35-medium",
            "stabilityai/stable-diffusion-3.5-medium",
            "StableDiffusion3Pipeline",
            1024,
            1024,
            dict(guidance_scale=4.5, max_sequence_length=256),
            "bfloat16",
            tiny_call=_T5_TINY,
        ),
        RealSize(
            "flux-dev",
            "black-forest-labs/FLUX.1-dev",
            "FluxPipeline",
            1024,
            1024,
            dict(guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt="", max_sequence_length=512),
            "bfloat16",
            tiny_call=_T5_TINY,
        ),
        RealSize(
            "flux-dev-no-guidance-embeds",
            "black-forest-labs/FLUX.1-dev (guidance_embeds=False)",
            "FluxPipeline",
            1024,
            1024,
            dict(true_cfg_scale=4.0, negative_prompt="", max_sequence_length=512),
            "bfloat16",
            tiny_call=_T5_TINY,
        ),
        RealSize(
            "pixart-sigma",
            "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
            "PixArtSigmaPipeline",
            1024,
            1024,
            dict(guidance_scale=4.5, max_sequence_length=300, clean_caption=False),
            "bfloat16",
            tiny_call=dict(_T5_TINY, use_resolution_binning=False),
        ),
        RealSize(
            "wan2.1-1.3b",
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            "WanPipeline",
            480,
            832,
            dict(guidance_scale=5.0, max_sequence_length=512),
            "bfloat16",
            num_frames=81,
            tiny_call=dict(_T5_TINY, num_frames=5),
        ),
    )
}


def build_real_pipeline(
    family: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tiny: bool = False,
    path: str | Path | None = None,
) -> Any:
    """A random-weight diffusers pipeline of `family` (a key of :data:`REAL_SIZES`) at its real size.

    `dtype` and `device`: where every component is created (``device="meta"`` builds the structure only,
    e.g. to count parameters). `tiny`: the same pipeline with every width and depth shrunk, for tests.
    `path`: also ``save_pretrained`` it there (nothing is written otherwise).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(_BUILDERS)}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    pipe = _BUILDERS[family](tiny, dtype, device, seed)
    if path is not None:
        pipe.save_pretrained(Path(path))
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    """Number of distinct parameters (tied ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
