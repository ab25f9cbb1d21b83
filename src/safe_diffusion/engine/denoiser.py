"""The guided denoiser: the engine's guided estimate for given latents, outside a pipeline's ``__call__``.

``GuidedDenoiser(pipe, *terms, guidance_scale=7.5)`` serves every family :func:`~safe_diffusion.guide`
serves. ``den(x_t, timestep, conditioning)`` returns the estimate the guided pipeline would compute
at that step — ε_∅ + s·(ε_p + Δ − ε_∅), with Δ the terms' correction — in the model's own prediction
space (ε, v or flow velocity), for latents in the layout the guidance math sees: (batch, channels,
*spatial), whatever the denoiser takes (FLUX and Qwen-Image tokens are packed here). Without a prompt
in the conditioning there is no classifier-free guidance: the estimate is ε_∅ + Δ, the terms seeing
ε_p = ε_∅ and a scale of 1 (LEDITS++ edits this way). The terms' per-run state (SLD's momentum,
LEDITS++'s masks) lives on the denoiser (:attr:`GuidedDenoiser.states`); :meth:`~GuidedDenoiser.reset`
starts a new run.

The same named parts as a pipeline's guided call do the work (:mod:`.parts`: concept rows, schedule,
row injection, combination, observation), in one denoiser call per evaluation. The
path has no ``torch.no_grad``: with grad enabled, gradients flow from the estimate to the latents and
to the conditioning's tensors, through the guidance terms' correction; the concepts' own rows are
constants (encoded once, without gradient). Under ``torch.no_grad`` it is plain inference.

What the pipeline's ``__call__`` does around its denoiser — the per-family argument conventions (SDXL's
``time_ids``, FLUX's packed latents, ids, ``timestep / 1000`` and guidance embedding, Qwen-Image's text
masks and ``img_shapes``, PixArt's micro-conditions, SD3's expanded timesteps) and how it encodes its
negative prompt — is a :class:`DirectCall` per adapter family here (:func:`register_direct_call` for a
new one). They live beside the adapters rather than in them so that the pipeline path stays exactly
what the adapters describe; ``tests/test_guided_denoiser.py`` checks each against its pipeline's own
guided call.

Over 500 lines (just): one direct call per served family (SD, SDXL, SD 3, FLUX, PixArt, Qwen-Image, Wan),
each short, kept together so a family's conditioning layout reads in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..common.errors import GuidanceError
from ..guidance.terms import GuidanceTerm
from .adapters import (
    DenoiserAdapter,
    FluxAdapter,
    PixArtAdapter,
    QwenImageAdapter,
    SD3Adapter,
    UNetAdapter,
    WanAdapter,
    encode_with,
    lora_scale,
    pack_tokens,
)
from .core import _CURRENT, _output_tensor
from .hooks import is_call_hook_term
from .parts import (
    Combination,
    ConceptRows,
    FixedCfg,
    Observing,
    RowInjection,
    RunSchedule,
)
from .support import served_denoisers

Rows = dict  # {path: tensor with one row per sample}, a path as in DenoiserAdapter.encode


@dataclass
class Conditioning:
    """The text conditioning of a guided-denoiser call: the unconditional rows and, for classifier-free
    guidance, the prompt's rows. Each is ``{path: tensor}`` with one row per sample, or one row for all
    samples (``path`` as the adapters name the denoiser's arguments: ``"encoder_hidden_states"``,
    ``("added_cond_kwargs", "text_embeds")``, …). Build it with :meth:`GuidedDenoiser.encode`, or from
    your own tensors (e.g. soft prompt embeddings that require grad)."""

    uncond: Rows
    prompt: Rows | None = None


# -- how each family's pipelines call their denoiser ----------------------------------------------------


class DirectCall:
    """The denoiser's arguments as the family's pipelines build them, and their negative prompt's encoding."""

    def __init__(self, adapter: DenoiserAdapter):
        self.adapter, self.pipe, self.model = adapter, adapter.pipe, adapter.model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def negative(self, text: str | None, arguments: dict, device) -> Rows:
        """The unconditional row, as the pipeline encodes its negative prompt (`text`, None for its default)."""
        return self.adapter.encode(["" if text is None else text], arguments, device)[0]

    def stack(self, groups: Sequence[Rows]) -> Rows:
        """Row groups (each with the batch's rows) joined along the batch."""
        out = {}
        for path in groups[0]:
            parts = [g[path] for g in groups]
            if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
                raise GuidanceError(
                    f"the conditioning's {path if isinstance(path, str) else path[1]} rows differ in shape "
                    f"({', '.join(str(tuple(p.shape[1:])) for p in parts)})"
                )
            out[path] = torch.cat(parts)
        return out

    def kwargs(self, x: torch.Tensor, timestep: torch.Tensor, rows: Rows, arguments: dict) -> dict:
        raise NotImplementedError

    def combine(self, uncond: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of the denoiser's outputs, as the pipeline combines them."""
        return uncond + scale * (text - uncond)

    def _put(self, kw: dict, rows: Rows) -> dict:
        for path, value in rows.items():
            value = value.to(self.dtype) if value.is_floating_point() else value
            if isinstance(path, tuple):
                kw.setdefault(path[0], {})[path[1]] = value
            else:
                kw[path] = value
        return kw


def _expanded(timestep: torch.Tensor, rows: int) -> torch.Tensor:
    return timestep.expand(rows) if timestep.ndim == 0 else timestep


class UNetCall(DirectCall):
    """SD 1.x/2.x and SDXL (``StableDiffusion(XL)Pipeline``): SDXL's size conditioning is (height, width)."""

    def __init__(self, adapter):
        super().__init__(adapter)
        latent = getattr(getattr(self.pipe, "vae", None), "config", None)
        channels = getattr(latent, "latent_channels", None)
        if channels is not None and self.model.config.in_channels != channels:
            raise GuidanceError(
                f"the UNet of {type(self.pipe).__name__} takes {self.model.config.in_channels} input channels "
                f"(an inpainting UNet: latents, mask and masked image); the guided denoiser gives it latents only"
            )

    def negative(self, text, arguments, device):
        out = encode_with(
            self.pipe,
            prompt=[""],
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None if text is None else [text],
            lora_scale=lora_scale(arguments),
            clip_skip=arguments.get("clip_skip"),
        )
        row: Rows = {"encoder_hidden_states": out[1][0]}
        if len(out) == 4:
            row[("added_cond_kwargs", "text_embeds")] = out[3][0]
        return row

    def kwargs(self, x, timestep, rows, arguments):
        kw: dict[str, Any] = {"sample": x.to(self.dtype), "timestep": timestep}
        self._put(kw, rows)
        pooled = kw.get("added_cond_kwargs", {}).get("text_embeds")
        if pooled is not None:
            h, w = (int(s) * int(self.pipe.vae_scale_factor) for s in x.shape[-2:])
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pooled.dtype, device=x.device)
            kw["added_cond_kwargs"]["time_ids"] = ids.expand(x.shape[0], -1)
        if arguments.get("cross_attention_kwargs"):
            kw["cross_attention_kwargs"] = arguments["cross_attention_kwargs"]
        kw["return_dict"] = False
        return kw


class SD3Call(DirectCall):
    """``StableDiffusion3Pipeline``: timesteps expanded to the rows; the negative prompt encoded with the prompt's."""

    def negative(self, text, arguments, device):
        out = encode_with(
            self.pipe,
            prompt=[""],
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None if text is None else [text],
            clip_skip=arguments.get("clip_skip"),
            max_sequence_length=arguments.get("max_sequence_length", 256),
            lora_scale=lora_scale(arguments),
        )
        return {"encoder_hidden_states": out[1][0], "pooled_projections": out[3][0]}

    def kwargs(self, x, timestep, rows, arguments):
        kw = self._put({"hidden_states": x.to(self.dtype), "timestep": _expanded(timestep, x.shape[0])}, rows)
        if arguments.get("joint_attention_kwargs"):
            kw["joint_attention_kwargs"] = arguments["joint_attention_kwargs"]
        kw["return_dict"] = False
        return kw


def _grid_ids(height: int, width: int, dtype, device) -> torch.Tensor:
    """FLUX's image token ids: (0, row, column) per 2x2 patch, row-major."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class FluxCall(DirectCall):
    """``FluxPipeline``: packed 2x2 latents, ``timestep / 1000``, text and image ids, the guidance embedding of
    a guidance-distilled model (the call's ``guidance_scale``, 3.5 by default, as the pipeline passes it)."""

    def kwargs(self, x, timestep, rows, arguments):
        n, _, h, w = x.shape
        kw: dict[str, Any] = {
            "hidden_states": pack_tokens(x.to(self.dtype)),
            "timestep": _expanded(timestep, n).to(self.dtype) / 1000,
        }
        self._put(kw, rows)
        guidance = None
        if getattr(self.model.config, "guidance_embeds", False):
            guidance = torch.full((n,), float(arguments.get("guidance_scale", 3.5)), device=x.device, dtype=self.dtype)
        kw["guidance"] = guidance
        kw["txt_ids"] = torch.zeros(kw["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=self.dtype)
        kw["img_ids"] = _grid_ids(h // 2, w // 2, self.dtype, x.device)
        if arguments.get("joint_attention_kwargs"):
            kw["joint_attention_kwargs"] = arguments["joint_attention_kwargs"]
        kw["return_dict"] = False
        return kw


class QwenImageCall(DirectCall):
    """``QwenImagePipeline``: packed latents, ``timestep / 1000``, ``img_shapes``; texts of their own lengths,
    padded and masked; true CFG rescaled to the norm of the prompt's estimate, as the pipeline does."""

    def stack(self, groups):
        hidden = [g["encoder_hidden_states"] for g in groups]
        full = max(h.shape[1] for h in hidden)
        if all(h.shape[1] == full for h in hidden) and all("encoder_hidden_states_mask" not in g for g in groups):
            return {"encoder_hidden_states": torch.cat(hidden)}
        padded, masks = [], []
        for g, h in zip(groups, hidden):
            mask = g.get("encoder_hidden_states_mask")
            if mask is None:
                mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
            padded.append(torch.nn.functional.pad(h, (0, 0, 0, full - h.shape[1])))
            masks.append(torch.nn.functional.pad(mask.long(), (0, full - h.shape[1])))
        return {"encoder_hidden_states": torch.cat(padded), "encoder_hidden_states_mask": torch.cat(masks)}

    def kwargs(self, x, timestep, rows, arguments):
        n, _, h, w = x.shape
        kw: dict[str, Any] = {
            "hidden_states": pack_tokens(x.to(self.dtype)),
            "timestep": _expanded(timestep, n).to(self.dtype) / 1000,
            "encoder_hidden_states_mask": None,
        }
        self._put(kw, rows)
        kw["img_shapes"] = [[(1, h // 2, w // 2)]] * n
        kw["guidance"] = None
        if getattr(self.model.config, "guidance_embeds", False):
            kw["guidance"] = torch.full(
                (n,), float(arguments.get("guidance_scale", 1.0)), device=x.device, dtype=self.dtype
            )
        if arguments.get("attention_kwargs"):
            kw["attention_kwargs"] = arguments["attention_kwargs"]
        kw["return_dict"] = False
        return kw

    def combine(self, uncond, text, scale):
        combined = uncond + scale * (text - uncond)
        return combined * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class PixArtCall(DirectCall):
    """``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline``: T5 tokens with their attention mask; micro-conditions
    (resolution, aspect ratio) only for a model that uses them."""

    def negative(self, text, arguments, device):
        out = encode_with(
            self.pipe,
            prompt=[""],
            do_classifier_free_guidance=True,
            negative_prompt="" if text is None else text,
            num_images_per_prompt=1,
            device=device,
            clean_caption=arguments.get("clean_caption", False),
            max_sequence_length=arguments.get("max_sequence_length", 300),
        )
        return {"encoder_hidden_states": out[2][0], "encoder_attention_mask": out[3][0]}

    def kwargs(self, x, timestep, rows, arguments):
        n = x.shape[0]
        kw = self._put({"hidden_states": x.to(self.dtype), "timestep": _expanded(timestep, n)}, rows)
        resolution = aspect = None
        if getattr(self.model, "use_additional_conditions", False):
            h, w = (int(s) * int(self.pipe.vae_scale_factor) for s in x.shape[-2:])
            resolution = torch.tensor([[h, w]], dtype=self.dtype, device=x.device).expand(n, -1)
            aspect = torch.tensor([[h / w]], dtype=self.dtype, device=x.device).expand(n, -1)
        kw["added_cond_kwargs"] = {"resolution": resolution, "aspect_ratio": aspect}
        kw["return_dict"] = False
        return kw


class WanCall(DirectCall):
    """``WanPipeline``: 5-D video latents, timesteps expanded to the rows."""

    def kwargs(self, x, timestep, rows, arguments):
        kw = self._put({"hidden_states": x.to(self.dtype), "timestep": _expanded(timestep, x.shape[0])}, rows)
        if arguments.get("attention_kwargs"):
            kw["attention_kwargs"] = arguments["attention_kwargs"]
        kw["return_dict"] = False
        return kw


#: Direct calls by adapter class; looked up along the adapter's class hierarchy, most derived first.
DIRECT_CALLS: dict[type[DenoiserAdapter], type[DirectCall]] = {
    UNetAdapter: UNetCall,
    SD3Adapter: SD3Call,
    FluxAdapter: FluxCall,
    QwenImageAdapter: QwenImageCall,
    PixArtAdapter: PixArtCall,
    WanAdapter: WanCall,
}


def register_direct_call(adapter: type[DenoiserAdapter], call: type[DirectCall]) -> None:
    """Teach the guided denoiser how a family's pipelines call its denoiser (see :class:`DirectCall`)."""
    DIRECT_CALLS[adapter] = call


def direct_call_for(adapter: DenoiserAdapter) -> DirectCall:
    for cls in type(adapter).__mro__:
        if cls in DIRECT_CALLS:
            return DIRECT_CALLS[cls](adapter)
    raise GuidanceError(
        f"the guided denoiser does not know how {type(adapter.pipe).__name__} calls its "
        f"{type(adapter.model).__name__}; register one with register_direct_call"
    )


# -- the guided denoiser ------------------------------------------------------------------------------


def slice_rows(value: Any, rows: slice, total: int) -> Any:
    """`value` with only the rows `rows` of every tensor that has `total` rows (recursively)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: slice_rows(v, rows, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(slice_rows(v, rows, total) for v in value)
    return value


class GuidedDenoiser:
    """The guided estimate of `pipe`'s denoiser with `terms`, for latents given by the caller (module docstring).

    `guidance_scale`: classifier-free guidance's scale for conditionings with a prompt. `total_steps`:
    the run's number of evaluations, for terms with fractional warm-ups. `arguments`: the pipeline-call
    arguments that shape encoding and the denoiser's call (``cross_attention_kwargs`` with a LoRA
    ``scale``, ``clip_skip``, ``max_sequence_length``, FLUX's ``guidance_scale`` embedding, …).
    `rows_per_call`: evaluate at most this many rows per denoiser call (memory), default all.

    Use it as a context manager, or call :meth:`close`, to end the run (the attention observers' clean-up).
    Terms that act on a pipeline call's prompt text (call hooks, :mod:`.hooks`: SAFREE) are refused in one
    line: the denoiser is given embeddings, not text.
    """

    def __init__(
        self,
        pipe,
        *terms: GuidanceTerm,
        guidance_scale: float = 1.0,
        total_steps: int | None = None,
        arguments: dict | None = None,
        rows_per_call: int | None = None,
    ):
        for term in terms:
            if is_call_hook_term(term):
                raise GuidanceError(
                    f"{type(term).__name__} acts on a pipeline call's prompt text, which GuidedDenoiser is not given"
                    " (it takes embeddings): use it inside guide(pipe, ...) on a pipeline call"
                )
            if not isinstance(term, GuidanceTerm):
                raise TypeError(f"{term!r} is not a guidance term")
        name, module, adapter_cls = served_denoisers(pipe)[0]
        self.pipe = pipe
        self.name = type(pipe).__name__
        self.module = module
        self.adapter = adapter_cls(pipe, name, module)
        self.call = direct_call_for(self.adapter)
        self.arguments = dict(arguments or {})
        self.guidance_scale = float(guidance_scale)
        self.rows_per_call = rows_per_call
        self.prediction = self.adapter.prediction()
        self.schedule = RunSchedule(terms)
        if total_steps is not None:
            self.schedule.resolve(total_steps)
        self.device = pipe._execution_device
        self.concepts = ConceptRows(self.adapter, self.schedule.terms, self.arguments, self.device, self.name)
        self.injection = RowInjection(self.concepts)
        self.observing = Observing(self.adapter, self.schedule.terms, self.concepts, self.name)
        self.cfg = FixedCfg(self.guidance_scale)
        self.combination = Combination(self.schedule.terms, self.prediction)

    # -- state -----------------------------------------------------------------------------------
    @property
    def terms(self) -> list:
        return self.combination.terms

    @property
    def states(self) -> list:
        """Per term, its state after the evaluations so far (e.g. SLD's momentum, LEDITS++'s masks)."""
        return self.combination.states

    @property
    def step(self) -> int:
        return self.combination.step

    def reset(self) -> None:
        """Start a new run: step 0, every term's initial state."""
        self.combination = Combination(self.combination.terms, self.prediction)

    def close(self) -> None:
        self.observing.close()

    def __enter__(self) -> GuidedDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- conditioning ----------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, negative_prompt: str | None = None) -> Conditioning:
        """One row each: the unconditional text (the pipeline's negative prompt, or its default) and the prompt
        (None: no classifier-free guidance). Encoded like the pipeline encodes them, without gradient."""
        with torch.no_grad():
            uncond = self.call.negative(negative_prompt, self.arguments, self.device)
            text = None if prompt is None else self.adapter.encode([prompt], self.arguments, self.device)[0]
        one = lambda rows: {k: v[None] for k, v in rows.items()}  # noqa: E731
        return Conditioning(one(uncond), None if text is None else one(text))

    # -- one evaluation --------------------------------------------------------------------------
    def __call__(
        self, x: torch.Tensor, timestep, conditioning: Conditioning, *, step: int | None = None
    ) -> torch.Tensor:
        """The guided estimate at latents `x` (batch, channels, *spatial) and `timestep` (the pipeline
        scheduler's units: a number, a 0-d tensor or one per sample). `step`: the evaluation index the
        terms see (default: the number of evaluations so far)."""
        adapter, batch = self.adapter, x.shape[0]
        groups = [conditioning.uncond] + ([conditioning.prompt] if conditioning.prompt is not None else [])
        n = len(groups)
        rows = self.call.stack([{k: _batch(v, batch) for k, v in g.items()} for g in groups])
        t = torch.as_tensor(timestep, device=x.device)
        t_rows = t if t.ndim == 0 else t.repeat(n)
        kw = self.call.kwargs(torch.cat([x] * n) if n > 1 else x, t_rows, rows, self.arguments)
        text = slice((n - 1) * batch, n * batch)
        if step is not None:
            self.combination.step = int(step)
        needed = self.combination.needed()
        if needed:
            kw = self.injection(adapter, kw, text, batch, needed)
            self.observing.arm(needed, n * batch, batch, adapter, kw)
        try:
            out = self._forward(kw).to(x.dtype)
        except BaseException:
            if self.observing.observer is not None:
                self.observing.observer.disarm()
            raise
        uncond = out[:batch]
        text_est = out[text] if n > 1 else uncond
        estimates = self.combination.estimates(needed, out, batch, n)
        observed = self.observing.observations(needed, batch, kw) if self.observing.active else None
        scale = self.guidance_scale if n > 1 else 1.0
        if self.terms:
            delta = self.combination.correction(adapter, kw, uncond, text_est, estimates, batch, scale, observed)
            text_est = text_est + delta
        self.combination.advance()
        folded = torch.cat([uncond, text_est]) if n > 1 else text_est
        guided = self.call.combine(folded[:batch], folded[text], scale) if n > 1 else folded
        return adapter.to_math(guided, kw)

    def _forward(self, kw: dict) -> torch.Tensor:
        total = kw[self.adapter.sample_arg].shape[0]
        chunk = self.rows_per_call if self.rows_per_call and self.rows_per_call < total else total
        shared = self.adapter.shared_args
        outs = []
        token = _CURRENT.set(None)  # a guide() block on the same pipeline must not act on these calls
        try:
            for start in range(0, total, chunk):
                part = (
                    kw
                    if chunk == total
                    else {
                        k: v if k in shared else slice_rows(v, slice(start, start + chunk), total)
                        for k, v in kw.items()
                    }
                )
                self.observing.set_offset(start)
                outs.append(_output_tensor(self.module(**part)))
        finally:
            _CURRENT.reset(token)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise GuidanceError(f"the conditioning has {value.shape[0]} rows for a batch of {batch} latents")
