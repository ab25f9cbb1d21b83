"""Denoiser adapters: what the engine must know about one family of denoisers and the pipelines that call it.

An adapter knows its denoiser's argument names (the latents, the text conditioning, pooled
projections, attention masks, added conditioning, arguments shared by every row), how its pipelines
encode text (so concepts are encoded exactly like the prompt, with the call's ``lora_scale``,
``clip_skip`` and ``max_sequence_length``), whether classifier-free guidance is one batched call or
two separate calls, what the denoiser predicts, and the latent layout the guidance math needs to see
(batch, channels, *spatial). The engine (:mod:`.core`) does the rest, the same way for every family.

A denoiser is recognised by its class (``isinstance`` against the diffusers model classes an
adapter lists), whatever the pipeline calls the component. New families plug in with
:func:`register_adapter`.

Over 500 lines (just): one adapter per served family (SD/SDXL, SD 3, FLUX, Qwen-Image, PixArt, Wan), each
short, with the shared token and text helpers they use, kept together so a family's layout reads in one place.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..common.errors import GuidanceError
from .spaces import epsilon_factor

Path = str | tuple[str, str]  # a forward argument, or (argument, key) inside a dict argument


def unwrap(module):
    """The model inside a ``torch.compile`` wrapper (``OptimizedModule``), or the module itself."""
    return getattr(module, "_orig_mod", module)


def sequence_length(call: dict, default: int, fixed: int = 0) -> int:
    """The text length to encode concepts to: that of the call's own ``prompt_embeds`` when it passes them (less
    the `fixed` CLIP tokens SD 3 puts before its T5 tokens), else its ``max_sequence_length``, else the
    pipeline's default. A prompt encoded by the caller to a shorter length is then guided as the plain
    pipeline accepts it."""
    embeds = call.get("prompt_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.ndim >= 2:
        return int(embeds.shape[-2]) - fixed
    return int(call.get("max_sequence_length") or default)


def lora_scale(call: dict) -> float | None:
    """The LoRA scale of the call, as every diffusers pipeline reads it from its attention kwargs."""
    for key in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
        kwargs = call.get(key)
        if kwargs:
            return kwargs.get("scale")
    return None


def encode_with(pipe, **kwargs):
    """``pipe.encode_prompt`` with the keyword arguments its signature accepts (the others dropped)."""
    params = inspect.signature(pipe.encode_prompt).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return pipe.encode_prompt(**kwargs)
    return pipe.encode_prompt(**{k: v for k, v in kwargs.items() if k in params})


def has_property(pipe, name: str) -> bool:
    return isinstance(getattr(type(pipe), name, None), property)


class DenoiserAdapter:
    """Base adapter; subclasses fill in the class attributes and override what their family does differently."""

    #: diffusers model classes (names in the ``diffusers`` namespace) this adapter serves
    model_classes: tuple[str, ...] = ()
    #: the forward argument holding the latents
    sample_arg: str = "hidden_states"
    #: forward arguments that are the same for every row and never extended along the batch
    shared_args: frozenset[str] = frozenset({"return_dict"})
    #: True when the pipeline evaluates the prompt and the negative prompt in two calls, prompt first
    separate_calls: bool = False
    #: the call argument that switches classifier-free guidance on (> 1)
    scale_arg: str = "guidance_scale"
    #: What a user can do instead when a pipeline of this family has no ``scale_arg`` (no CFG to join).
    without_cfg_advice: str = (
        "use a pipeline of the family that runs classifier-free guidance, or an erased checkpoint "
        "(safe-diffusion erase), which needs none"
    )

    def __init__(self, pipe, name: str, module: torch.nn.Module):
        self.pipe = pipe
        self.name = name
        self.module = module
        self.model = unwrap(module)
        params = list(inspect.signature(self.model.forward).parameters.values())
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @classmethod
    def serves(cls, module) -> bool:
        import diffusers

        classes = tuple(c for c in (getattr(diffusers, n, None) for n in cls.model_classes) if c is not None)
        return bool(classes) and isinstance(unwrap(module), classes)

    # -- arguments -------------------------------------------------------------------------------
    def as_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments as keywords (positional ones named after the model's forward)."""
        named = dict(kwargs)
        for name, value in zip(self.positional, args):
            named[name] = value
        return named

    def auxiliary(self, kwargs: dict) -> bool:
        """Whether this denoiser call is not the guidance evaluation (e.g. SD3's skip-layer call)."""
        return False

    # -- classifier-free guidance ----------------------------------------------------------------
    def cfg_in_call(self, call: dict) -> tuple[bool, str]:
        """Whether the call runs classifier-free guidance, and otherwise why and how to turn it on."""
        scale = call.get(self.scale_arg)
        if scale is None or float(scale) <= 1.0:
            return False, f"{self.scale_arg}={scale}; pass {self.scale_arg} > 1"
        return True, ""

    def cfg_now(self, call: dict, entry: bool) -> bool:
        """Whether guidance is still on at this denoiser call (a callback may turn it off mid-run)."""
        if has_property(self.pipe, "do_classifier_free_guidance"):
            return bool(self.pipe.do_classifier_free_guidance)
        return entry

    def guidance_scale(self, call: dict) -> float:
        """The classifier-free guidance scale in effect now."""
        if has_property(self.pipe, "guidance_scale") and not self.separate_calls:
            return float(self.pipe.guidance_scale)
        return float(call.get(self.scale_arg))

    # -- text ------------------------------------------------------------------------------------
    def encode(self, texts: list[str], call: dict, device) -> list[dict[Path, torch.Tensor]]:
        """Per text, the rows it puts in place of the prompt's conditioning: ``{path: per-row tensor}``."""
        raise NotImplementedError

    # -- what the denoiser predicts --------------------------------------------------------------
    def prediction(self) -> str:
        """ "epsilon", "v_prediction", "sample" or "flow" (flow-matching velocity)."""
        return getattr(self.pipe.scheduler.config, "prediction_type", None) or "epsilon"

    def epsilon_scale(self, kwargs: dict, batch: int) -> torch.Tensor | None:
        """Per sample, the factor c with ε_a − ε_b = c·(out_a − out_b) at this call's x_t (None: c = 1):
        :func:`~.spaces.epsilon_factor` at the call's timestep."""
        prediction = self.prediction()
        t = torch.as_tensor(kwargs["timestep"])
        if prediction == "flow" and t.ndim > 1:  # per-token timesteps (Wan 2.2 TI2V): the sample's noise level
            t = t.amax(dim=tuple(range(1, t.ndim)))
        try:
            c = epsilon_factor(
                prediction,
                t,
                alphas_cumprod=getattr(self.pipe.scheduler, "alphas_cumprod", None),
                timestep_scale=self.timestep_scale(),
            )
        except ValueError as exc:
            raise GuidanceError(str(exc)) from None
        if c is None:
            return None
        return c.expand(batch) if c.numel() == 1 else c[:batch]

    def timestep_scale(self) -> float:
        """What the pipeline multiplies σ by to get the timestep it passes (1000, or 1 when it divides first)."""
        return float(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000))

    # -- layout ----------------------------------------------------------------------------------
    def to_math(self, tensor: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The estimate as the math needs it: (batch, channels, *spatial)."""
        return tensor

    def from_math(self, tensor: torch.Tensor, kwargs: dict, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_math`, shaped like the denoiser's output `like`."""
        return tensor

    # -- rows ------------------------------------------------------------------------------------
    def extend(self, kwargs: dict, text: slice, blocks: list[dict[Path, torch.Tensor]], batch: int) -> dict:
        """The call's keyword arguments with one block of `batch` rows per concept appended.

        A concept's block takes its own conditioning (the paths in its dict) and copies the prompt
        rows `text` of every other per-row argument, so the latents, timesteps, ControlNet residuals,
        IP-Adapter embeddings and added conditioning of the prompt ride along.
        """
        rows = kwargs[self.sample_arg].shape[0]
        out = {}
        for name, value in kwargs.items():
            if name in self.shared_args:
                out[name] = value
            elif isinstance(value, dict):
                out[name] = {key: self._join(value[key], (name, key), text, blocks, batch, rows) for key in value}
            else:
                out[name] = self._join(value, name, text, blocks, batch, rows)
        return out

    def _join(self, value: Any, path: Path, text: slice, blocks, batch: int, rows: int) -> Any:
        if any(path in b for b in blocks):
            parts = [value]
            for block in blocks:
                row = block[path].to(device=value.device, dtype=value.dtype)
                if row.shape != value.shape[1:]:
                    raise GuidanceError(
                        f"a guidance concept encodes to {path if isinstance(path, str) else path[1]} of shape "
                        f"{tuple(row.shape)} but the prompt to {tuple(value.shape[1:])}; give prompts the pipeline "
                        "encodes itself, or concepts as embeddings of the prompt's shape"
                    )
                parts.append(row.expand(batch, *row.shape))
            return torch.cat(parts)
        return copy_text_rows(value, text, len(blocks), rows)


def copy_text_rows(value: Any, text: slice, blocks: int, rows: int) -> Any:
    """Append `blocks` copies of the prompt rows `text` to every tensor with `rows` rows (recursively)."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == rows and blocks:
            prompt = value[text]
            return torch.cat([value] + [prompt] * blocks)
        return value
    if isinstance(value, dict):
        return {k: copy_text_rows(v, text, blocks, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_text_rows(v, text, blocks, rows) for v in value)
    return value


def _rows(out, i: int) -> torch.Tensor | None:
    return None if out is None else out[i]


# -- UNet families: Stable Diffusion 1.x/2.x, SDXL, their img2img / inpainting / ControlNet pipelines -----


class UNetAdapter(DenoiserAdapter):
    """``UNet2DConditionModel``: CFG batched as [negative; prompt]; SDXL's pooled text in ``added_cond_kwargs``."""

    model_classes = ("UNet2DConditionModel",)
    sample_arg = "sample"

    def cfg_in_call(self, call):
        if getattr(self.model.config, "time_cond_proj_dim", None) is not None:
            return False, "the UNet is guidance-distilled (time_cond_proj_dim, e.g. LCM) and runs without it"
        return super().cfg_in_call(call)

    def encode(self, texts, call, device):
        out = encode_with(
            self.pipe,
            prompt=texts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            lora_scale=lora_scale(call),
            clip_skip=call.get("clip_skip"),
        )
        embeds, pooled = out[0], (out[2] if len(out) == 4 else None)
        rows = []
        for i in range(len(texts)):
            row: dict[Path, torch.Tensor] = {"encoder_hidden_states": embeds[i]}
            if pooled is not None:
                row[("added_cond_kwargs", "text_embeds")] = pooled[i]
            rows.append(row)
        return rows


# -- Stable Diffusion 3 -------------------------------------------------------------------------------


class SD3Adapter(DenoiserAdapter):
    """``SD3Transformer2DModel``: CFG batched; CLIP-L/G + (optional) T5 tokens and pooled projections; flow."""

    model_classes = ("SD3Transformer2DModel",)

    def auxiliary(self, kwargs):
        return kwargs.get("skip_layers") is not None  # skip-layer guidance's extra, prompt-only call

    def encode(self, texts, call, device):
        out = encode_with(
            self.pipe,
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=call.get("clip_skip"),
            max_sequence_length=sequence_length(call, 256, fixed=self.pipe.tokenizer_max_length),
            lora_scale=lora_scale(call),
        )
        return [{"encoder_hidden_states": out[0][i], "pooled_projections": out[2][i]} for i in range(len(texts))]

    def prediction(self):
        return "flow"


# -- FLUX.1 with true classifier-free guidance ----------------------------------------------------------


def unpack_tokens(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(batch, h·w, C·4) packed 2x2 patches → (batch, C, 2h, 2w), the latent image the patches tile."""
    b, _tokens, packed = tensor.shape
    c = packed // 4
    return tensor.reshape(b, height, width, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height * 2, width * 2)


def pack_tokens(tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_tokens`."""
    b, c, h2, w2 = tensor.shape
    h, w = h2 // 2, w2 // 2
    return tensor.reshape(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)


class FluxAdapter(DenoiserAdapter):
    """``FluxTransformer2DModel`` in ``FluxPipeline``: true CFG as two calls, prompt first; packed latents; flow."""

    model_classes = ("FluxTransformer2DModel",)
    separate_calls = True
    scale_arg = "true_cfg_scale"
    shared_args = frozenset({"return_dict", "txt_ids", "img_ids"})
    without_cfg_advice = (
        "its guidance_scale is FLUX's distilled-guidance embedding, not CFG. Use FluxPipeline, FluxImg2ImgPipeline, "
        "FluxInpaintPipeline, FluxControlNetPipeline or FluxKontextPipeline with true_cfg_scale > 1 and a "
        "negative_prompt, or an erased checkpoint (safe-diffusion erase), which needs no CFG"
    )

    def cfg_in_call(self, call):
        scale = call.get("true_cfg_scale")
        negative = call.get("negative_prompt") is not None or (
            call.get("negative_prompt_embeds") is not None and call.get("negative_pooled_prompt_embeds") is not None
        )
        if scale is not None and float(scale) > 1.0 and negative:
            return True, ""
        return False, (
            f"true_cfg_scale={scale}{'' if negative else ', no negative_prompt'}; enable true CFG with "
            "true_cfg_scale > 1 and a negative_prompt (e.g. true_cfg_scale=4.0, negative_prompt='')"
        )

    def cfg_now(self, call, entry):
        return entry

    def encode(self, texts, call, device):
        out = encode_with(
            self.pipe,
            prompt=texts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=sequence_length(call, 512),
            lora_scale=lora_scale(call),
        )
        return [{"encoder_hidden_states": out[0][i], "pooled_projections": out[1][i]} for i in range(len(texts))]

    def prediction(self):
        return "flow"

    def timestep_scale(self):
        return 1.0  # the pipeline passes timestep / 1000 = σ

    def _grid(self, kwargs) -> tuple[int, int]:
        """The latent's token grid. Kontext appends the reference image's tokens, whose ids start with 1;
        the latent's own come first, with ids (0, row, column)."""
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        ids = ids[ids[:, 0] == 0] if bool((ids[:, 0] != 0).any()) else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def to_math(self, tensor, kwargs):
        """The latent tokens (the first h·w; reference-image tokens after them are left out) as an image."""
        h, w = self._grid(kwargs)
        return unpack_tokens(tensor[:, : h * w], h, w)

    def from_math(self, tensor, kwargs, like):
        """Packed again; reference-image tokens (Kontext, Qwen-Image-Edit) get no correction: the pipeline
        drops their estimates, and they ride unchanged."""
        packed = pack_tokens(tensor)
        extra = like.shape[1] - packed.shape[1]
        if extra <= 0:
            return packed
        return torch.cat([packed, packed.new_zeros(packed.shape[0], extra, packed.shape[2])], dim=1)


# -- Qwen-Image -------------------------------------------------------------------------------------------


class QwenImageAdapter(FluxAdapter):
    """``QwenImageTransformer2DModel``: true CFG as two calls; variable-length text with a mask; packed latents."""

    model_classes = ("QwenImageTransformer2DModel",)
    shared_args = frozenset({"return_dict", "img_shapes", "txt_seq_lens"})
    without_cfg_advice = (
        "use a Qwen-Image pipeline with true_cfg_scale > 1 and a negative_prompt, or an erased checkpoint "
        "(safe-diffusion erase), which needs no CFG"
    )

    def cfg_in_call(self, call):
        scale = call.get("true_cfg_scale")
        negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        if scale is not None and float(scale) > 1.0 and negative:
            return True, ""
        return False, (
            f"true_cfg_scale={scale}{'' if negative else ', no negative_prompt'}; enable true CFG with "
            "true_cfg_scale > 1 and a negative_prompt (e.g. true_cfg_scale=4.0, negative_prompt=' ')"
        )

    def encode(self, texts, call, device):
        rows = []
        for text in texts:  # one at a time: each keeps its own length, no padding
            embeds, _ = encode_with(
                self.pipe,
                prompt=[text],
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=call.get("max_sequence_length", 512),
            )
            rows.append({"encoder_hidden_states": embeds[0]})
        return rows

    def _grid(self, kwargs):
        shapes = kwargs["img_shapes"]
        first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
        return int(first[1]), int(first[2])

    def extend(self, kwargs, text, blocks, batch):
        hidden = kwargs["encoder_hidden_states"]
        mask = kwargs.get("encoder_hidden_states_mask")
        rows, length, dim = hidden.shape
        concepts = [b["encoder_hidden_states"] for b in blocks]
        full = max([length] + [c.shape[0] for c in concepts])
        if mask is None and all(c.shape[0] == length for c in concepts):
            new_mask = None
        else:
            base = torch.ones(rows, length, dtype=torch.long, device=hidden.device) if mask is None else mask
            parts = [torch.nn.functional.pad(base.long(), (0, full - length))]
            for c in concepts:
                m = torch.zeros(full, dtype=torch.long, device=hidden.device)
                m[: c.shape[0]] = 1
                parts.append(m.expand(batch, full))
            new_mask = torch.cat(parts)
        parts = [torch.nn.functional.pad(hidden, (0, 0, 0, full - length))]
        for c in concepts:
            c = c.to(device=hidden.device, dtype=hidden.dtype)
            parts.append(torch.nn.functional.pad(c, (0, 0, 0, full - c.shape[0])).expand(batch, full, dim))
        rest = {k: v for k, v in kwargs.items() if k not in ("encoder_hidden_states", "encoder_hidden_states_mask")}
        out = super().extend(rest, text, [{}] * len(blocks), batch)
        out["encoder_hidden_states"] = torch.cat(parts)
        out["encoder_hidden_states_mask"] = new_mask
        return out


# -- PixArt-α / PixArt-Σ ----------------------------------------------------------------------------------


class PixArtAdapter(DenoiserAdapter):
    """``PixArtTransformer2DModel``: CFG batched; T5 tokens with an attention mask; learned-σ output channels."""

    model_classes = ("PixArtTransformer2DModel",)

    def encode(self, texts, call, device):
        out = encode_with(
            self.pipe,
            prompt=texts,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=device,
            clean_caption=call.get("clean_caption", False),
            max_sequence_length=sequence_length(call, 300),
        )
        embeds, mask = out[0], out[1]
        return [{"encoder_hidden_states": embeds[i], "encoder_attention_mask": mask[i]} for i in range(len(texts))]

    def _learned_sigma(self, tensor) -> bool:
        return tensor.shape[1] == 2 * self.model.config.in_channels

    def to_math(self, tensor, kwargs):
        # learned σ: the output is [ε; variance] along channels; guidance acts on ε only.
        return tensor[:, : tensor.shape[1] // 2] if self._learned_sigma(tensor) else tensor

    def from_math(self, tensor, kwargs, like):
        if like.shape[1] != tensor.shape[1]:
            return torch.cat([tensor, torch.zeros_like(tensor)], dim=1)
        return tensor


# -- Wan text-to-video --------------------------------------------------------------------------------------


class WanAdapter(DenoiserAdapter):
    """``WanTransformer3DModel``: CFG as two calls, prompt first; UMT5 tokens; 5-D video latents; flow."""

    model_classes = ("WanTransformer3DModel",)
    separate_calls = True

    def encode(self, texts, call, device):
        out = encode_with(
            self.pipe,
            prompt=texts,
            negative_prompt=None,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=sequence_length(call, 512),
            device=device,
        )
        return [{"encoder_hidden_states": out[0][i]} for i in range(len(texts))]

    def guidance_scale(self, call):
        second = getattr(self.pipe, "transformer_2", None)
        if second is not None and self.module is second and getattr(self.pipe, "_guidance_scale_2", None):
            return float(self.pipe._guidance_scale_2)
        return (
            float(self.pipe.guidance_scale)
            if has_property(self.pipe, "guidance_scale")
            else float(call.get("guidance_scale"))
        )

    def prediction(self):
        return "flow"


#: The adapters, most specific first; :func:`register_adapter` adds to them.
ADAPTERS: list[type[DenoiserAdapter]] = [
    UNetAdapter,
    SD3Adapter,
    FluxAdapter,
    QwenImageAdapter,
    PixArtAdapter,
    WanAdapter,
]


def register_adapter(adapter: type[DenoiserAdapter]) -> type[DenoiserAdapter]:
    """Teach the engine a new denoiser family (usable as a class decorator)."""
    ADAPTERS.insert(0, adapter)
    return adapter


def adapter_for(module) -> type[DenoiserAdapter] | None:
    for adapter in ADAPTERS:
        if adapter.serves(module):
            return adapter
    return None


def known_denoisers() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]
