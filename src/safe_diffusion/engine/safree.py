"""SAFREE on the engine: ``guide(pipe, SafreeGuidance())`` filters the prompt's own embedding rows per step.

SAFREE is not a correction of noise estimates, so it joins ``guide()`` as a call hook
(:mod:`~safe_diffusion.engine.hooks`) rather than as concept rows:

* **On entering guide()** the pipeline is checked: SAFREE is defined for the families of the official
  code, SD 1.x/2.x, SDXL and SD 3 (with its T5 encoder); every other pipeline is refused in one line.
* **At the start of each call** the concepts and the prompt are encoded the way the official code
  encodes them (:class:`_Text`: one vector per concept, one per masked prompt token), giving per prompt
  the trigger tokens and the projection (I − P_C) P_I; with ``concepts_as_negative_prompt`` the
  concepts, joined, are encoded as the negative prompt.
* **At each denoiser evaluation** the negative rows take the concepts' encoding and the prompt rows the
  filtered embedding while the filter is active for that prompt (every step, a range of steps, or the
  self-validating filter's first steps, decided from the prompt rows at the first evaluation). Concept
  rows of SLD/SEGA terms in the same ``guide()`` keep their own text.
* **Latent re-attention** (``re_attention=True``, UNet families): while the filter is active one more
  block of rows, the prompt with its original embedding, is appended to the batch; forward pre-hooks on
  the UNet's up blocks compare the filtered prompt's skip features with the original's there
  (:func:`~safe_diffusion.guidance.safree.reattend_low_frequencies`); the engine drops those rows after
  the call. The hooks are installed for one call and removed when it ends.

The math lives in :mod:`safe_diffusion.guidance.safree`; docs/guidance.md, "SAFREE", lists the official
file:line of every default and where this deviates.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

import torch

from ..common.errors import GuidanceError, UnsupportedPipelineError
from ..guidance.safree import (
    SafreeGuidance,
    filter_matrix,
    filter_tokens,
    keep_mask,
    project_tokens,
    projection_matrix,
    reattend_low_frequencies,
    scale_backbone,
    self_validation_last_step,
    self_validation_strength,
    trigger_tokens,
)
from .adapters import SD3Adapter, UNetAdapter, copy_text_rows
from .hooks import Evaluation, register_call_hook
from .support import served_denoisers

logger = logging.getLogger(__name__)

#: The SAFREE call whose appended original-prompt rows the UNet is evaluating now (this thread/task).
_REATTENDING: ContextVar[_SafreeCall | None] = ContextVar("safe_diffusion_safree_reattending", default=None)

FAMILIES = "SD 1.x/2.x, SDXL and SD 3 with T5"


# -- what SAFREE reads from a family's text encoders ---------------------------------------------------------


def _tokens(tokenizer, texts, **kwargs):
    return tokenizer(texts, return_tensors="pt", **kwargs)


def _masked_ids(tokenizer, text: str, max_length: int) -> torch.Tensor | None:
    """The prompt's ids once per real token, that token replaced by id 0 (official _masked_encode_prompt,
    models/modified_stable_diffusion_pipeline.py:211-229): row i masks position i + 1; the first and the last
    position (CLIP's start and end tokens) are never masked, as there."""
    ids = _tokens(tokenizer, [text], padding="longest").input_ids
    ids = ids[:, :max_length]
    return _mask_each(ids)


def _mask_each(ids: torch.Tensor) -> torch.Tensor | None:
    """(n, length) copies of the (1, length) ids, copy i with position i + 1 set to 0; None when n = length − 2 ≤ 0."""
    n = ids.shape[1] - 2
    if n <= 0:
        return None
    masked = ids.repeat(n, 1)
    index = torch.arange(n)
    masked[index, index + 1] = 0
    return masked


class _Text:
    """Where SAFREE's vectors come from in one family, and which feature columns of the prompt's rows it filters."""

    family = ""
    columns = slice(None)

    def __init__(self, pipe):
        self.pipe = pipe
        self.device = pipe._execution_device

    def concept_vectors(self, concepts: list[str], call: dict) -> torch.Tensor:
        raise NotImplementedError

    def masked_vectors(self, text: str, call: dict) -> torch.Tensor | None:
        """(n, d): the prompt encoded once per real token with that token masked; None if it has none."""
        raise NotImplementedError

    def active(self, text: str, length: int, call: dict) -> torch.Tensor:
        """(length,) bool: the positions of the prompt's real tokens in its encoded rows."""
        return self._clip_active(self.pipe.tokenizer, text, length)

    @staticmethod
    def _clip_active(tokenizer, text: str, length: int) -> torch.Tensor:
        mask = _tokens(tokenizer, [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        mask = mask.attention_mask[0].bool()
        return torch.nn.functional.pad(mask, (0, max(0, length - mask.numel())))[:length]


class _SDText(_Text):
    """SD 1.x/2.x: the CLIP encoder's pooled output (official models/modified_stable_diffusion_pipeline.py:186-229)."""

    family = "sd"

    def _pooled(self, ids, mask=None):
        out = self.pipe.text_encoder(ids.to(self.device), attention_mask=None if mask is None else mask.to(self.device))
        return out.pooler_output

    def concept_vectors(self, concepts, call):
        tok = self.pipe.tokenizer
        enc = _tokens(tok, concepts, padding="max_length", max_length=tok.model_max_length, truncation=True)
        return self._pooled(enc.input_ids, enc.attention_mask)

    def masked_vectors(self, text, call):
        masked = _masked_ids(self.pipe.tokenizer, text, self.pipe.tokenizer.model_max_length)
        return None if masked is None else self._pooled(masked)


class _SDXLText(_Text):
    """SDXL: the second encoder's projected pooled output, filtering its part of the prompt's features
    (official models/modified_stable_diffusion_xl_pipeline.py:335-353, :1461-1487: ``[..., 768:]``)."""

    family = "sdxl"

    def __init__(self, pipe):
        super().__init__(pipe)
        first = getattr(pipe, "text_encoder", None)
        self.columns = slice(first.config.hidden_size if first is not None else 0, None)

    def _pooled(self, ids):
        return self.pipe.text_encoder_2(ids.to(self.device), output_hidden_states=True)[0]

    def concept_vectors(self, concepts, call):
        tok = self.pipe.tokenizer_2
        return self._pooled(
            _tokens(tok, concepts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        )

    def masked_vectors(self, text, call):
        masked = _masked_ids(self.pipe.tokenizer_2, text, self.pipe.tokenizer_2.model_max_length)
        return None if masked is None else self._pooled(masked)

    def active(self, text, length, call):
        return self._clip_active(self.pipe.tokenizer_2, text, length)


class _SD3Text(_Text):
    """SD 3: T5's first-token output (official sdv3/sdv3_pipeline.py:721-830), filtering every feature of the
    joint CLIP + T5 sequence (:1067-1076)."""

    family = "sd3"

    def _length(self, call) -> int:
        return int(call.get("max_sequence_length") or 256)

    def _first_token(self, ids, mask=None):
        out = self.pipe.text_encoder_3(
            ids.to(self.device), attention_mask=None if mask is None else mask.to(self.device)
        )
        return out.last_hidden_state[:, 0, :]

    def concept_vectors(self, concepts, call):
        enc = _tokens(self.pipe.tokenizer_3, concepts, padding="max_length", max_length=self._length(call),
                      truncation=True, add_special_tokens=True)  # fmt: skip
        return self._first_token(enc.input_ids, enc.attention_mask)

    def masked_vectors(self, text, call):
        tok = self.pipe.tokenizer_3
        masked = _mask_each(
            _tokens(tok, [text], padding="longest", max_length=self._length(call), truncation=True).input_ids
        )
        return None if masked is None else self._first_token(masked)

    def active(self, text, length, call):
        clip = self._clip_active(self.pipe.tokenizer, text, self.pipe.tokenizer.model_max_length)
        enc = _tokens(
            self.pipe.tokenizer_3, [text], padding="max_length", max_length=self._length(call), truncation=True
        )
        mask = torch.cat([clip, enc.attention_mask[0].bool()])
        return torch.nn.functional.pad(mask, (0, max(0, length - mask.numel())))[:length]


def text_family(pipe) -> type[_Text]:
    """The SAFREE text reader for `pipe`, or an UnsupportedPipelineError naming why not (one line)."""
    name = type(pipe).__name__
    found = served_denoisers(pipe)
    adapter = found[0][2]
    if adapter is UNetAdapter or issubclass(adapter, UNetAdapter):
        if getattr(pipe, "text_encoder_2", None) is not None:
            second = pipe.text_encoder_2
            if getattr(second.config, "projection_dim", None) != second.config.hidden_size:
                raise UnsupportedPipelineError(
                    f"SAFREE cannot serve {name}: its text_encoder_2 projects pooled text to "
                    f"{second.config.projection_dim} features but its tokens have {second.config.hidden_size}"
                )
            return _SDXLText
        if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
            return _SDText
    if adapter is SD3Adapter or issubclass(adapter, SD3Adapter):
        if getattr(pipe, "text_encoder_3", None) is None:
            raise UnsupportedPipelineError(
                f"SAFREE cannot serve {name} without its T5 encoder (text_encoder_3): the official SD 3 code "
                "reads the toxic subspace from T5"
            )
        return _SD3Text
    raise UnsupportedPipelineError(
        f"SAFREE cannot serve {name}: it is defined for {FAMILIES} (the official code's families)"
    )


# -- the hook -----------------------------------------------------------------------------------------------


def check(term: SafreeGuidance, pipe) -> None:
    """Refuse, on entering guide(), a pipeline SAFREE is not defined for (one line)."""
    family = text_family(pipe)
    if term.re_attention and family is _SD3Text:
        raise UnsupportedPipelineError(
            f"SAFREE's latent re-attention acts on UNet up blocks; {type(pipe).__name__} has none "
            "(use re_attention=False)"
        )


def _prompts(call: dict, family: type[_Text]) -> list[str]:
    """The texts the prompt rows were encoded from (SDXL's second encoder reads prompt_2, SD 3's T5 prompt_3)."""
    key = {"sdxl": "prompt_2", "sd3": "prompt_3"}.get(family.family)
    prompt = (call.get(key) if key else None) or call.get("prompt")
    if prompt is None or call.get("prompt_embeds") is not None:
        raise GuidanceError("SAFREE filters the prompt's tokens: pass the prompt as text, not prompt_embeds")
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _negative_given(call: dict) -> bool:
    for name, value in call.items():
        if not name.startswith("negative_prompt") or value is None:
            continue
        texts = [value] if isinstance(value, str) else value
        if isinstance(value, torch.Tensor) or any(isinstance(t, str) and t.strip() for t in texts):
            return True
    return False


def _with_rows(kwargs: dict, path, rows: slice, value: torch.Tensor) -> dict:
    """`kwargs` with `rows` of the tensor at `path` (an argument, or (argument, key)) set to `value`, copy-on-write."""
    name, key = (path, None) if isinstance(path, str) else path
    holder = kwargs[name] if key is None else kwargs[name][key]
    new = holder.clone()
    new[rows] = value.to(device=new.device, dtype=new.dtype)
    out = dict(kwargs)
    if key is None:
        out[name] = new
    else:
        out[name] = {**kwargs[name], key: new}
    return out


class _Prompt:
    """SAFREE's plan for one prompt of the call: its projection, trigger tokens and filtered steps."""

    def __init__(self, matrix: torch.Tensor | None, triggers: torch.Tensor, text: str):
        self.matrix, self.triggers, self.text = matrix, triggers, text
        self.keep: torch.Tensor | None = None
        self.last_step: int | None = None


class _SafreeCall:
    """One guided pipeline call with a :class:`SafreeGuidance`."""

    def __init__(self, term: SafreeGuidance, pipe, adapter, call: dict):
        family = text_family(pipe)
        if call.get("skip_guidance_layers"):
            raise GuidanceError("SAFREE is not defined with SD 3's skip-layer guidance (skip_guidance_layers)")
        if term.concepts_as_negative_prompt and _negative_given(call):
            raise GuidanceError(
                "SafreeGuidance(concepts_as_negative_prompt=True) makes the negative prompt its concepts, as the "
                "official code does; drop the call's negative prompt or set concepts_as_negative_prompt=False"
            )
        self.term, self.pipe, self.adapter, self.call = term, pipe, adapter, call
        self.text = family(pipe)
        self.family = self.text.family
        self.self_validation = term.resolved_self_validation(self.family)
        texts = _prompts(call, family)
        with torch.no_grad():
            concepts = self.text.concept_vectors(list(term.concepts), call)
            p_c = projection_matrix(concepts)
            self.prompts = []
            for text in texts:
                masked = self.text.masked_vectors(text, call)
                if masked is None:  # no token to test (an empty prompt): nothing to filter
                    self.prompts.append(_Prompt(None, torch.zeros(0, dtype=torch.bool), text))
                    continue
                if masked.shape[-1] != p_c.shape[-1]:
                    raise GuidanceError(
                        f"SAFREE's concept vectors have {p_c.shape[-1]} features but the prompt's {masked.shape[-1]}"
                    )
                triggers = trigger_tokens(masked, p_c, term.alpha)
                self.prompts.append(_Prompt(filter_matrix(p_c, projection_matrix(masked)), triggers, text))
            self.negative = None
            if term.concepts_as_negative_prompt:
                joined = ", ".join(term.concepts)
                self.negative = adapter.encode([joined], {**call, "clip_skip": None}, self.text.device)[0]
        logger.debug(
            "SAFREE: %s trigger tokens of %s",
            [int(p.triggers.sum()) for p in self.prompts],
            [int(p.triggers.numel()) for p in self.prompts],
        )
        self.handles: list = []
        self.res_channels: dict[int, list[int]] = {}
        self.token = None
        self.batch = 0
        if term.re_attention:
            self._install(adapter.model)

    # -- which rows use the filtered embedding ---------------------------------------------------------
    def _plan(self, embeds: torch.Tensor, batch: int) -> list[_Prompt]:
        """Per prompt row, its prompt's plan (rows are the prompts in order, each repeated for its images)."""
        if batch % len(self.prompts):
            raise GuidanceError(f"SAFREE: {batch} prompt rows for {len(self.prompts)} prompts")
        per = batch // len(self.prompts)
        rows = [self.prompts[r // per] for r in range(batch)]
        length = embeds.shape[-2]
        for i, prompt in enumerate(self.prompts):
            if prompt.keep is None or prompt.keep.numel() != length:
                prompt.keep = keep_mask(prompt.triggers, length).to(embeds.device)
            if self.self_validation and prompt.last_step is None and prompt.matrix is not None:
                tokens = embeds[i * per][..., self.text.columns]
                projected = project_tokens(tokens, prompt.matrix)
                active = self.text.active(prompt.text, length, self.call).to(embeds.device)
                beta = self_validation_strength(tokens, projected, active)
                prompt.last_step = self_validation_last_step(
                    beta, self.term.upper_step, self.term.svf_midpoint, self.term.svf_steepness
                )
                logger.debug("SAFREE: self-validating filter β=%.4f, filtered steps 0..%d", beta, prompt.last_step)
        return rows

    def filtered_at(self, prompt: _Prompt, step: int) -> bool:
        if prompt.matrix is None:
            return False
        if self.self_validation:
            return step <= prompt.last_step
        window = self.term.filter_steps
        return window is None or window[0] <= step <= window[1]

    # -- the denoiser's arguments ----------------------------------------------------------------------
    def before(self, kwargs: dict, evaluation: Evaluation) -> dict:
        if evaluation.kind != "batched":  # check() refuses the families whose pipelines make two calls per step
            raise GuidanceError(
                f"SAFREE: a {evaluation.kind} call cannot be filtered (one batched call per step needed)"
            )
        step, batch = evaluation.step, evaluation.batch
        out = kwargs
        if self.negative is not None:
            for path, row in self.negative.items():
                out = _with_rows(out, path, slice(0, batch), row)
        embeds = kwargs["encoder_hidden_states"]
        original = embeds[batch : 2 * batch]
        rows = self._plan(original, batch)
        use = [self.filtered_at(p, step) for p in rows]
        if any(use):
            cols = self.text.columns
            prompt_rows = original.clone()
            for r, (prompt, on) in enumerate(zip(rows, use)):
                if on:
                    prompt_rows[r, :, cols] = filter_tokens(original[r, :, cols], prompt.matrix, prompt.keep)
            out = _with_rows(out, "encoder_hidden_states", slice(batch, 2 * batch), prompt_rows)
            if self.handles:
                out = self._append_original(out, original, batch, use)
        return out

    def _append_original(self, kwargs: dict, original: torch.Tensor, batch: int, use: list[bool]) -> dict:
        """One more block of rows, last: the prompt rows with their original embedding (for re-attention)."""
        rows = kwargs[self.adapter.sample_arg].shape[0]
        text = slice(batch, 2 * batch)
        out = {k: (v if k in self.adapter.shared_args else copy_text_rows(v, text, 1, rows)) for k, v in kwargs.items()}
        out["encoder_hidden_states"] = torch.cat([kwargs["encoder_hidden_states"], original])
        self.batch = batch
        self.reattend_rows = torch.tensor(use, device=original.device)
        self.token = _REATTENDING.set(self)
        return out

    def after(self, output=None) -> None:
        if self.token is not None:
            _REATTENDING.reset(self.token)
            self.token = None

    def close(self) -> None:
        self.after()
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()

    # -- latent re-attention: hooks on the UNet's up blocks ---------------------------------------------
    def _install(self, unet) -> None:
        widths = sorted(set(unet.config.block_out_channels), reverse=True)
        b1, b2 = self.term.backbone_factors()
        s1, s2 = self.term.skip_scales()
        # Official free_lunch_utils.py:170-175: features of 1280 channels take (b1, s1), of 640 (b2, s2) — SD's
        # and SDXL's two widest levels; other UNets: their widest and second-widest.
        self.stages = {widths[0]: (b1, s1)}
        if len(widths) > 1:
            self.stages[widths[1]] = (b2, s2)
        try:
            for block in unet.up_blocks:
                self.handles.append(block.register_forward_pre_hook(self._before_block, with_kwargs=True))
                for index, resnet in enumerate(block.resnets):
                    self.handles.append(resnet.register_forward_pre_hook(self._resnet_hook(block, index)))
        except BaseException:
            self.close()
            raise

    def _before_block(self, block, args, kwargs) -> None:
        if _REATTENDING.get() is self:
            res = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
            self.res_channels[id(block)] = [r.shape[1] for r in reversed(res)]  # resnet i takes res[-1 - i]

    def _resnet_hook(self, block, index: int):
        def hook(module, args):
            if _REATTENDING.get() is not self:
                return None
            x = args[0]
            skip = self.res_channels[id(block)][index]
            hidden = x.shape[1] - skip
            stage = self.stages.get(hidden)
            if stage is None:
                return None
            factor, scale = stage
            b, rows, on = self.batch, x.shape[0], self.reattend_rows
            h, res = scale_backbone(x[:, :hidden], factor), x[:, hidden:]
            prompt = res[b : 2 * b].clone()
            prompt[on] = reattend_low_frequencies(
                prompt[on], res[rows - b :][on], scale, self.term.re_attention_threshold
            )
            res = torch.cat([res[:b], prompt, res[2 * b :]])
            return (torch.cat([h, res], dim=1), *args[1:])

        return hook


def _bind(term: SafreeGuidance, pipe, adapter, call: dict) -> _SafreeCall:
    return _SafreeCall(term, pipe, adapter, call)


register_call_hook(SafreeGuidance, check, _bind)
