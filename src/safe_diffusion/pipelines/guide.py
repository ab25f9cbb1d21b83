"""Attach guidance terms to a diffusers pipeline the user already has.

The pipeline runs unchanged. A forward pre-hook on its UNet appends one row block per concept
(the prompt's latents, the concept's embeddings) to the classifier-free-guidance batch, so every
denoising step stays a single UNet evaluation; a forward hook takes those rows back out and folds
each term's correction into the prompt's estimate, so the pipeline's own guidance formula yields
the guided estimate. A new denoising loop is recognised by the pipeline calling its progress bar,
which every diffusers pipeline does once before its loop; steps are counted in UNet calls, as the
reference pipelines count them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..guidance.terms import GuidanceTerm

logger = logging.getLogger(__name__)

_ENGINE_ATTR = "_safe_diffusion_engine"


@dataclass
class _Run:
    """The state of one denoising loop."""

    step: int = 0
    states: list = field(default_factory=list)
    embeds: list = field(default_factory=list)  # per term, per concept: (tokens, dim) tensor
    pooled: list = field(default_factory=list)  # per term, per concept: (dim,) tensor or None
    pending: tuple | None = None  # (batch, [(term, concept), ...]) between the two hooks


def encode_concepts(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode concept texts with the pipeline's own text encoder(s): (embeddings, pooled or None)."""
    out = pipe.encode_prompt(
        prompt=texts,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        clip_skip=getattr(pipe, "_clip_skip", None),
    )
    if len(out) == 4:  # SDXL-style: (embeds, negative, pooled, negative pooled)
        return out[0], out[2]
    return out[0], None


def _extend(value: Any, batch: int, blocks: int) -> Any:
    """Append `blocks` copies of the prompt rows [batch, 2·batch) to every tensor with 2·batch rows."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == 2 * batch and blocks:
            text = value[batch:]
            return torch.cat([value] + [text] * blocks)
        return value
    if isinstance(value, dict):
        return {k: _extend(v, batch, blocks) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_extend(v, batch, blocks) for v in value)
    return value


#: Pipelines with a UNet that this engine must not serve, and why: their classifier-free-guidance batch is
#: not [negative; prompt] (PAG and InstructPix2Pix add a third block) or they call the UNet outside that batch.
UNSERVED = {
    "PAG": "perturbed-attention guidance adds a third block to the guidance batch",
    "InstructPix2Pix": "its guidance batch has three blocks (text, image, unconditional)",
    "SAG": "self-attention guidance calls the UNet again outside the guidance batch",
    "Panorama": "it denoises views of the latents one UNet call each, outside one guidance batch",
}


def check_supported(pipe) -> None:
    """Refuse, in one line naming the pipeline, a pipeline this engine cannot guide correctly."""
    from ..errors import UnsupportedPipelineError

    name = type(pipe).__name__
    for marker, why in UNSERVED.items():
        if marker in name:
            raise UnsupportedPipelineError(f"guide() cannot serve {name}: {why}")
    if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "no UNet"
        raise UnsupportedPipelineError(
            f"guide() cannot serve {name} yet: its denoiser is a {denoiser}; SLD and SEGA run on UNet pipelines "
            "with classifier-free guidance (SD 1.x/2.x, SDXL, img2img, inpainting, ControlNet)"
            if denoiser == "transformer"
            else f"guide() cannot serve {name}: it has {denoiser}; SLD and SEGA run on UNet pipelines"
        )
    if not callable(getattr(pipe, "encode_prompt", None)) or not callable(getattr(pipe, "progress_bar", None)):
        raise UnsupportedPipelineError(
            f"guide() cannot serve {name}: it lacks encode_prompt or progress_bar, which the engine uses to encode "
            "concepts and to see each new denoising loop (modular pipelines: not yet supported)"
        )


class GuidanceEngine:
    """Runs guidance terms inside a pipeline's UNet calls; see the module docstring."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.terms: list[GuidanceTerm] = []
        self._run: _Run | None = None
        self._handles: list = []
        self._warned_no_cfg = False
        self._patched = False
        self.strict = False

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self) -> None:
        unet = self.pipe.unet
        # one at a time, so that detach() removes whatever was registered if a later step fails
        self._handles.append(unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        self._handles.append(unet.register_forward_hook(self._after_unet, with_kwargs=True))
        self._own_progress_bar = vars(self.pipe).get("progress_bar")
        original = self.pipe.progress_bar

        def progress_bar(*args, **kwargs):
            self._start_loop()
            return original(*args, **kwargs)

        object.__setattr__(self.pipe, "progress_bar", progress_bar)
        self._patched = True
        object.__setattr__(self.pipe, _ENGINE_ATTR, self)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._patched:
            if self._own_progress_bar is None:
                vars(self.pipe).pop("progress_bar", None)
            else:
                object.__setattr__(self.pipe, "progress_bar", self._own_progress_bar)
            self._patched = False
        vars(self.pipe).pop(_ENGINE_ATTR, None)
        self._run = None

    # -- one denoising loop ----------------------------------------------------------------------
    def _start_loop(self) -> None:
        run = _Run(states=[t.initial_state() for t in self.terms])
        texts = sorted({c for t in self.terms for c in t.concepts if isinstance(c, str)})
        encoded = {}
        if texts:
            embeds, pooled = encode_concepts(self.pipe, texts)
            encoded = {text: (embeds[i], None if pooled is None else pooled[i]) for i, text in enumerate(texts)}
        for term in self.terms:
            term_embeds, term_pooled = [], []
            for concept in term.concepts:
                if isinstance(concept, str):
                    e, p = encoded[concept]
                else:
                    e, p = concept, None
                term_embeds.append(e)
                term_pooled.append(p)
            run.embeds.append(term_embeds)
            run.pooled.append(term_pooled)
        self._run = run

    def _cfg_active(self) -> bool:
        active = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if not active and self.strict:
            from ..errors import GuidanceOffError

            names = ", ".join(dict.fromkeys(type(t).__name__ for t in self.terms))
            raise GuidanceOffError(
                f"{names} cannot act: classifier-free guidance is off in this call (guidance_scale <= 1, or turned "
                "off by a callback); use guidance_scale > 1"
            )
        if not active and not self._warned_no_cfg:
            logger.warning("guidance terms need classifier-free guidance (guidance_scale > 1); running unguided")
            self._warned_no_cfg = True
        return active

    def _before_unet(self, module, args, kwargs):
        run = self._run
        if run is None or not self.terms:
            return None
        run.pending = None
        if not self._cfg_active():
            return None
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0] // 2
        needed = [(ti, ci) for ti, term in enumerate(self.terms) for ci, flag in enumerate(term.needs(run.step)) if flag]
        run.pending = (batch, needed)
        if not needed:
            return None
        blocks = len(needed)

        # Positional sample, timestep, encoder_hidden_states as UNet2DConditionModel.forward names them.
        names = ["sample", "timestep", "encoder_hidden_states"]
        for i, value in enumerate(args[: len(names)]):
            kwargs[names[i]] = value
        args = args[len(names) :]

        hidden = kwargs["encoder_hidden_states"]
        rows = []
        for ti, ci in needed:
            e = run.embeds[ti][ci].to(device=hidden.device, dtype=hidden.dtype)
            if e.shape != hidden.shape[1:]:
                raise ValueError(
                    f"a guidance concept encodes to shape {tuple(e.shape)} but the prompt to {tuple(hidden.shape[1:])};"
                    " pass prompts and concepts of the same token length"
                )
            rows.append(e.expand(batch, *e.shape))
        added = kwargs.get("added_cond_kwargs")
        for key, value in kwargs.items():
            if key not in ("encoder_hidden_states", "added_cond_kwargs"):
                kwargs[key] = _extend(value, batch, blocks)
        kwargs["encoder_hidden_states"] = torch.cat([hidden, *rows])
        if added is not None:
            added = dict(added)
            text_embeds = added.pop("text_embeds", None)
            added = _extend(added, batch, blocks)
            if text_embeds is not None:
                pooled = []
                for ti, ci in needed:
                    p = run.pooled[ti][ci]
                    if p is None:
                        raise ValueError("this pipeline needs pooled text embeddings; give concepts as text")
                    pooled.append(p.to(text_embeds).expand(batch, *p.shape))
                added["text_embeds"] = torch.cat([text_embeds, *pooled])
            kwargs["added_cond_kwargs"] = added
        return tuple(args), kwargs

    def _after_unet(self, module, args, kwargs, output):
        run = self._run
        if run is None or run.pending is None:
            return None
        batch, needed = run.pending
        run.pending = None
        step = run.step
        run.step += 1

        noise = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = noise[:batch], noise[batch : 2 * batch]
        extra = noise[2 * batch :].split(batch) if needed else ()
        per_term = [[None] * len(term.concepts) for term in self.terms]
        for (ti, ci), estimate in zip(needed, extra):
            per_term[ti][ci] = estimate

        guidance_scale = float(self.pipe.guidance_scale)
        correction = None
        for ti, term in enumerate(self.terms):
            delta, run.states[ti] = term.apply(uncond, text, per_term[ti], step, run.states[ti], guidance_scale)
            correction = delta if correction is None else correction + delta
        guided = torch.cat([uncond, text + correction])
        if isinstance(output, tuple):
            return (guided, *output[1:])
        return type(output)(sample=guided)


@contextmanager
def guide(pipe, *terms: GuidanceTerm, strict: bool = False) -> Iterator[Any]:
    """Make `pipe` apply the given guidance terms while inside the block; afterwards it is exactly as before.

    ``with guide(pipe, SafetyGuidance.from_preset("strong"), SemanticGuidance(["sunglasses"])): pipe(prompt)``.
    Blocks nest: an inner block adds its terms to the outer block's for its duration.

    The terms act through classifier-free guidance. When a call runs without it (``guidance_scale <= 1``,
    or a callback that turns it off mid-run) they cannot act: by default the engine logs a warning once
    and the image is unguided; with ``strict=True`` the call raises :class:`~safe_diffusion.errors.GuidanceOffError`
    (the CLI, the evaluation runner and the demo use strict mode, so a result that says SLD was applied means it was).
    """
    for term in terms:
        if not isinstance(term, GuidanceTerm):
            raise TypeError(f"{term!r} is not a guidance term")
    engine = vars(pipe).get(_ENGINE_ATTR)
    owner = engine is None
    if owner:
        check_supported(pipe)
        engine = GuidanceEngine(pipe)
        try:
            engine.attach()
        except BaseException:
            engine.detach()
            raise
    before, strict_before = list(engine.terms), engine.strict
    engine.terms = before + list(terms)
    engine.strict = strict_before or strict
    try:
        yield pipe
    finally:
        engine.terms = before
        engine.strict = strict_before
        if owner:
            engine.detach()
