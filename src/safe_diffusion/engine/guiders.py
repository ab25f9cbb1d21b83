"""SLD and SEGA as diffusers guiders, for modular pipelines (``diffusers.guiders.BaseGuidance``).

A modular pipeline's denoising step asks its ``guider`` for the batches to evaluate, runs the
denoiser once per batch, and hands the estimates back to the guider to combine. The guiders here
add one batch per guidance concept that the term needs at this step (the prompt's inputs with the
concept's text in place of the prompt's) and combine the estimates with the same term objects,
and so the same pure functions, that :func:`~safe_diffusion.engine.guide` uses:
ε_∅ + s_g·(ε_p + Δ − ε_∅), Δ from :meth:`GuidanceTerm.apply`.

The concepts are encoded by a block we ship, :class:`GuidanceConceptsStep`, inserted after the
pipeline's text encoder (:func:`with_guidance_concepts`): it encodes them with the pipeline's own
text-encoding function, ``clip_skip`` and LoRA scale, as the prompt is encoded. Served: the modular
Stable Diffusion XL blocks (verified on text-to-image and img2img) and Stable Diffusion 3 blocks
(:data:`ENCODERS`); every other modular family is refused in one line naming it. Terms act where
``guide()`` makes them act (``space="auto"``): on the denoiser's own output for ε- and v-prediction, on
its ε-equivalent for flow matching, with the factor c taken from the step's timestep and the scheduler
(engine/spaces.py), so no x_t is needed.

    blocks = with_guidance_concepts(StableDiffusionXLAutoBlocks())
    pipe = blocks.init_pipeline("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_components(torch_dtype=torch.float16)
    pipe.update_components(guider=SafetyGuider.from_preset("max", guidance_scale=7.5))
    image = pipe(prompt="…", output="images")[0]

Like diffusers' own guiders, a guider holds the state of the run it serves (step, momentum): one
guider serves one pipeline call at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.modular_pipelines.modular_pipeline import BlockState, ModularPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam

from ..common.errors import GuidanceError, GuidanceOffError
from ..guidance.sld import DEFAULT_SAFETY_CONCEPT, SafetyConfig
from ..guidance.terms import (
    GuidanceTerm,
    SafetyGuidance,
    SemanticGuidance,
    for_schedule,
    needed_concepts,
    resolve_space,
)
from .spaces import apply_in_epsilon, epsilon_factor

_CONCEPT_PREFIX = "pred_concept_"


class TermsGuider(BaseGuidance):
    """Classifier-free guidance with guidance terms (:class:`SafetyGuidance`, :class:`SemanticGuidance`) added.

    The subclasses :class:`SafetyGuider` and :class:`SemanticGuider` are what users build; this class
    holds the mechanics shared by every term.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]  # noqa: RUF012  (diffusers' BaseGuidance declares it so)

    def __init__(self, terms: Sequence[GuidanceTerm], guidance_scale: float, enabled: bool = True):
        super().__init__(0.0, 1.0, enabled)
        if not float(guidance_scale) > 1.0:
            raise GuidanceOffError(
                f"{type(self).__name__} needs classifier-free guidance, which guidance_scale={guidance_scale} "
                "turns off; give a guidance_scale above 1"
            )
        for term in terms:
            if any(not isinstance(c, str) for c in term.concepts):
                raise GuidanceError(f"{type(self).__name__} takes its concepts as text, not embeddings")
        self.guidance_scale = float(guidance_scale)
        self._base_terms = list(terms)
        self._terms = list(terms)
        self._states: list[Any] = [t.initial_state() for t in terms]
        self._rows: dict[str, dict[str, torch.Tensor]] = {}
        self._bound = False
        self._needed: list[tuple[int, int]] = []
        self._spaces: list[str] = ["model"] * len(self._terms)
        self._epsilon_scale: Callable[[Any], torch.Tensor | None] | None = None

    # -- what the concepts step gives ----------------------------------------------------------------
    @property
    def concept_texts(self) -> list[str]:
        """The concepts to encode, each once."""
        return sorted({c for t in self._base_terms for c in t.concepts})

    def bind_concepts(
        self,
        rows: dict[str, dict[str, torch.Tensor]],
        prediction: str,
        epsilon_scale: Callable[[Any], torch.Tensor | None] | None = None,
    ) -> None:
        """Per concept text, its conditioning by denoiser-input name (one row each), for the next call;
        `prediction` is the pipeline's prediction type ("epsilon", "v_prediction", "flow", …); `epsilon_scale`
        maps a step's timestep to the factor c of engine/spaces.py (needed by terms acting in ε space on
        models that predict something else)."""
        self._spaces = [resolve_space(getattr(term, "space", "auto"), prediction) for term in self._base_terms]
        if prediction != "epsilon" and "epsilon" in self._spaces and epsilon_scale is None:
            raise GuidanceError(
                f"{type(self).__name__}: a term acting in ε space on a {prediction!r}-prediction model needs the "
                "step's noise level; bind the concepts with an epsilon_scale, or use space='model'"
            )
        self._epsilon_scale = epsilon_scale if prediction != "epsilon" else None
        missing = [c for c in self.concept_texts if c not in rows]
        if missing:
            raise GuidanceError(f"{type(self).__name__}: no encoding given for the concept(s) {missing}")
        self._rows = rows
        self._bound = True

    # -- the loop ------------------------------------------------------------------------------------
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:
            if not self._bound:
                raise GuidanceError(
                    f"{type(self).__name__} has no encoded concepts for this call: build the pipeline's blocks "
                    "with safe_diffusion.engine.guiders.with_guidance_concepts(blocks)"
                )
            self._bound = False  # each call encodes its own (clip_skip, LoRA scale)
            self._terms = for_schedule(self._base_terms, num_inference_steps)
            self._states = [t.initial_state() for t in self._terms]
        self._needed = needed_concepts(self._terms, step)

    @property
    def num_conditions(self) -> int:
        if not self._enabled:
            return 1
        return 2 + (len(self._needed) if self._step is not None else 0)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared != 2  # the prompt's batch and the concepts' batches; not the negative one

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        batches = [self._prepare_batch(data, 0, "pred_cond")]
        if self.num_conditions == 1:
            return batches
        if not any(isinstance(v, tuple) for v in data.values()):
            # diffusers would evaluate the prompt's inputs as the "unconditional" batch: CFG and the terms silently off
            raise GuidanceOffError(
                f"{type(self).__name__} needs classifier-free guidance, and this pipeline call gave the guider no "
                "negative conditioning (modular SD 3 runs it only with a negative prompt: pass negative_prompt='')"
            )
        batches.append(self._prepare_batch(data, 1, "pred_uncond"))
        cond = batches[0]
        for ti, ci in self._needed:
            batches.append(self._concept_batch(cond, self._terms[ti].concepts[ci], f"{_CONCEPT_PREFIX}{ti}_{ci}"))
        return batches

    def prepare_inputs_from_block_state(self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]):
        pairs = {}
        for name, source in input_fields.items():
            sources = (source, source) if isinstance(source, str) else tuple(source)
            pairs[name] = tuple(None if s is None else getattr(data, s, None) for s in sources)
        return self.prepare_inputs(pairs)

    def _concept_batch(self, cond: BlockState, concept: str, identifier: str) -> BlockState:
        rows = self._rows[concept]
        values = {}
        for name, value in cond.as_dict().items():
            if name in rows and isinstance(value, torch.Tensor):
                row = rows[name].to(device=value.device, dtype=value.dtype)
                values[name] = row.unsqueeze(0).expand(value.shape[0], *row.shape)
            else:
                values[name] = value
        values[self._identifier_key] = identifier
        return BlockState(**values)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None, **concepts) -> GuiderOutput:
        if pred_uncond is None:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)
        if pred_cond.ndim < 4:
            raise GuidanceError(
                f"{type(self).__name__} needs latents laid out (batch, channels, …spatial); this pipeline's are "
                f"{tuple(pred_cond.shape)} (packed tokens): use guide() on the non-modular pipeline"
            )
        per_term = [[None] * len(term.concepts) for term in self._terms]
        for name, estimate in concepts.items():
            ti, ci = (int(i) for i in name[len(_CONCEPT_PREFIX) :].split("_"))
            per_term[ti][ci] = estimate
        delta = torch.zeros_like(pred_cond)
        c = None
        if self._epsilon_scale is not None and "epsilon" in self._spaces:
            c = self._epsilon_scale(self._timestep)
            c = None if c is None else c.expand(pred_cond.shape[0]) if c.numel() == 1 else c
        for ti, term in enumerate(self._terms):

            def apply(u, t, concepts, term=term, ti=ti):
                return term.apply(u, t, concepts, self._step, self._states[ti], self.guidance_scale)

            if self._spaces[ti] == "epsilon" and c is not None:
                d, self._states[ti] = apply_in_epsilon(apply, c, pred_uncond, pred_cond, per_term[ti])
            else:
                d, self._states[ti] = apply(pred_uncond, pred_cond, per_term[ti])
            delta = delta + d
        pred = pred_uncond + self.guidance_scale * (pred_cond + delta - pred_uncond)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def describe(self, prediction: str | None = None) -> dict:
        """The guider's settings, JSON-ready: its CFG scale and each term's own description."""
        return {
            "type": type(self).__name__,
            "guidance_scale": self.guidance_scale,
            "terms": [t.describe(prediction) for t in self._base_terms],
        }


class SafetyGuider(TermsGuider):
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023) as a diffusers guider: the fields of
    :class:`~safe_diffusion.guidance.SafetyGuidance` plus the classifier-free guidance scale."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        concept: str = DEFAULT_SAFETY_CONCEPT,
        scale: float = 1000.0,
        warmup_steps: int = 10,
        threshold: float = 0.01,
        momentum_scale: float = 0.3,
        mom_beta: float = 0.4,
        warmup_fraction: float | None = None,
        space: str = "auto",
        enabled: bool = True,
    ):
        term = SafetyGuidance(
            concept=concept,
            scale=scale,
            warmup_steps=warmup_steps,
            threshold=threshold,
            momentum_scale=momentum_scale,
            mom_beta=mom_beta,
            warmup_fraction=warmup_fraction,
            space=space,
        )
        super().__init__([term], guidance_scale, enabled)

    @classmethod
    def from_preset(cls, name: str, guidance_scale: float = 7.5, **overrides) -> SafetyGuider:
        """The paper's WEAK / MEDIUM / STRONG / MAX hyper-parameters (SLD, Table 1); `overrides` replace fields."""
        p = SafetyConfig.get(name)
        fields = dict(
            scale=p.sld_guidance_scale,
            warmup_steps=p.sld_warmup_steps,
            threshold=p.sld_threshold,
            momentum_scale=p.sld_momentum_scale,
            mom_beta=p.sld_mom_beta,
        )
        return cls(guidance_scale=guidance_scale, **{**fields, **overrides})


class SemanticGuider(TermsGuider):
    """Semantic guidance, SEGA (Brack et al., NeurIPS 2023), as a diffusers guider: the fields of
    :class:`~safe_diffusion.guidance.SemanticGuidance` plus the classifier-free guidance scale."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        concepts: Sequence[str] = (),
        reverse: bool | Sequence[bool] = False,
        scale: float | Sequence[float] = 5.0,
        threshold: float | Sequence[float] = 0.9,
        warmup_steps: int | Sequence[int] = 10,
        cooldown_steps: int | Sequence[int | None] | None = None,
        weights: Sequence[float] | None = None,
        momentum_scale: float = 0.1,
        mom_beta: float = 0.4,
        warmup_fraction: float | Sequence[float | None] | None = None,
        cooldown_fraction: float | Sequence[float | None] | None = None,
        space: str = "auto",
        enabled: bool = True,
    ):
        term = SemanticGuidance(
            concepts=[concepts] if isinstance(concepts, str) else list(concepts),
            reverse=reverse,
            scale=scale,
            threshold=threshold,
            warmup_steps=warmup_steps,
            cooldown_steps=cooldown_steps,
            weights=weights,
            momentum_scale=momentum_scale,
            mom_beta=mom_beta,
            warmup_fraction=warmup_fraction,
            cooldown_fraction=cooldown_fraction,
            space=space,
        )
        super().__init__([term], guidance_scale, enabled)


# -- the block that encodes the concepts ------------------------------------------------------------------


def _encode_sdxl(components, texts: list[str], block_state) -> list[dict[str, torch.Tensor]]:
    from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep

    kwargs = block_state.cross_attention_kwargs or {}
    embeds, _, pooled, _ = StableDiffusionXLTextEncoderStep.encode_prompt(
        components,
        texts,
        None,
        components._execution_device,
        1,
        False,
        lora_scale=kwargs.get("scale"),
        clip_skip=block_state.clip_skip,
    )
    # names as the SDXL denoising step gives them to the guider
    return [{"prompt_embeds": embeds[i], "text_embeds": pooled[i]} for i in range(len(texts))]


def _encode_sd3(components, texts: list[str], block_state) -> list[dict[str, torch.Tensor]]:
    from diffusers.modular_pipelines.stable_diffusion_3.encoders import encode_prompt

    kwargs = block_state.joint_attention_kwargs or {}
    embeds, _, pooled, _ = encode_prompt(
        components,
        texts,
        device=components._execution_device,
        clip_skip=block_state.clip_skip,
        max_sequence_length=block_state.max_sequence_length or 256,
        lora_scale=kwargs.get("scale"),
    )
    # names as the SD 3 denoising step gives them to the guider
    return [{"encoder_hidden_states": embeds[i], "text_embeds": pooled[i]} for i in range(len(texts))]


class ConceptEncoder(NamedTuple):
    """How one modular family encodes the guiders' concepts: the function (its own text-encoding code, so
    concepts are encoded as the prompt is) and the pipeline inputs that shape the encoding."""

    encode: Callable  # (components, texts, block_state) -> per text, {guider input name: one row}
    inputs: tuple[InputParam, ...]


#: Per modular pipeline family (``model_name`` of its blocks): how its concepts are encoded. The other
#: families diffusers ships are refused by :func:`with_guidance_concepts` in one line naming the family.
ENCODERS: dict[str, ConceptEncoder] = {
    "stable-diffusion-xl": ConceptEncoder(
        _encode_sdxl, (InputParam("cross_attention_kwargs"), InputParam("clip_skip"))
    ),
    "stable-diffusion-3": ConceptEncoder(
        _encode_sd3,
        (
            InputParam("joint_attention_kwargs"),
            InputParam("clip_skip"),
            InputParam("max_sequence_length", type_hint=int, default=256),
        ),
    ),
}


def _epsilon_scale(scheduler, prediction: str) -> Callable[[Any], torch.Tensor | None]:
    """timestep -> the factor c of :func:`~.spaces.epsilon_factor` from the scheduler alone (no x_t needed)."""
    if prediction not in ("epsilon", "v_prediction", "flow"):
        raise GuidanceError(f"space='epsilon' is not defined for a model predicting {prediction!r}; use space='model'")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    scale = float(getattr(scheduler.config, "num_train_timesteps", 1000))
    return lambda t: epsilon_factor(prediction, t, alphas_cumprod=alphas, timestep_scale=scale)


class GuidanceConceptsStep(ModularPipelineBlocks):
    """Encodes the guider's concepts as the pipeline encodes its prompt and hands them to the guider."""

    model_name = "stable-diffusion-xl"

    def __init__(self, model_name: str | None = None):
        super().__init__()
        if model_name is not None:
            self.model_name = model_name

    @property
    def description(self) -> str:
        return "safe-diffusion: encode the SafetyGuider/SemanticGuider concepts with the pipeline's text encoders"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from diffusers.guiders import ClassifierFreeGuidance

        return [ComponentSpec("guider", ClassifierFreeGuidance)]

    @property
    def inputs(self) -> list[InputParam]:
        return list(ENCODERS[self.model_name].inputs)

    @property
    def intermediate_outputs(self) -> list:
        return []

    @torch.no_grad()
    def __call__(self, components, state):
        guider = components.guider
        if isinstance(guider, TermsGuider) and guider.concept_texts:
            block_state = self.get_block_state(state)
            encode = ENCODERS[self.model_name].encode
            texts = guider.concept_texts
            rows = dict(zip(texts, encode(components, texts, block_state)))
            scheduler = getattr(components, "scheduler", None)
            prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
            if "FlowMatch" in type(scheduler).__name__:
                prediction = "flow"
            try:
                scale = _epsilon_scale(scheduler, prediction)
            except GuidanceError:  # a prediction type with no ε-equivalent: only space="model" terms can act
                scale = None
            guider.bind_concepts(rows, prediction, scale)
        return components, state


def with_guidance_concepts(blocks):
    """`blocks` (modular pipeline blocks, e.g. ``StableDiffusionXLAutoBlocks()``) with
    :class:`GuidanceConceptsStep` inserted after the text encoder; returns the same object."""
    model = getattr(blocks, "model_name", None)
    if model not in ENCODERS:
        raise GuidanceError(
            f"safe-diffusion's guiders serve the modular blocks of {', '.join(ENCODERS)}, not {model or type(blocks).__name__}"
        )
    names = list(blocks.sub_blocks)
    if "guidance_concepts" not in names:
        if "text_encoder" not in names:
            raise GuidanceError(f"{type(blocks).__name__} has no 'text_encoder' block to encode the concepts after")
        step = GuidanceConceptsStep(model)
        blocks.sub_blocks.insert("guidance_concepts", step, names.index("text_encoder") + 1)
    return blocks
