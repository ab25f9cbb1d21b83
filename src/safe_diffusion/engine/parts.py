"""The named parts of one guided run, shared by a pipeline's guided call (:mod:`.core`) and the guided
denoiser that runs outside one (:mod:`.denoiser`).

As diffusers' hooks are small named objects with their own state, a guided run is five parts, each
with one job:

* :class:`ConceptRows` — **concept encoding**: every term's concepts as the denoiser rows that stand
  for them, encoded once per run with the run's own arguments (``lora_scale``, ``clip_skip``,
  ``max_sequence_length``), as constants without gradient.
* :class:`RunSchedule` — **schedule resolution**: fractional warm-ups resolved against the run's
  number of denoiser evaluations.
* :class:`PipelineCfg` / :class:`FixedCfg` — **CFG detection**: whether classifier-free guidance runs
  (at the call's entry, and at each denoiser call: a callback may turn it off) and its scale now.
* :class:`RowInjection` — **row injection** (the pre-hook's work): one block of rows per needed concept
  appended to the denoiser's batch.
* :class:`Combination` — **combination** (the post-hook's work): each term's correction Δ from the
  estimates, the terms' per-run state, the step counter. Terms that declare ``observes`` get an
  :class:`Observation` of the evaluation (its timestep, and the concept rows' cross-attention maps
  from :mod:`.attention`) through ``apply_observed`` — the one extension of the
  :class:`~safe_diffusion.guidance.terms.GuidanceTerm` protocol, used by LEDITS++'s implicit masks.

Terms that act on the denoiser's call itself rather than through concept rows (SAFREE) are not parts
of every run: they are call hooks (:mod:`.hooks`), bound per pipeline call by :mod:`.core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..common.errors import GuidanceError
from ..guidance.terms import for_schedule, needed_concepts, resolve_space
from .attention import AttentionObserver, attention_factor, token_span
from .spaces import apply_in_epsilon

# -- concept encoding ---------------------------------------------------------------------------------


class ConceptRows:
    """Per term, per concept, the rows that stand for it: ``{path: per-row tensor}`` (see ``DenoiserAdapter.encode``)."""

    def __init__(self, adapter, terms: Sequence, arguments: dict, device, name: str):
        texts = sorted({c for t in terms for c in t.concepts if isinstance(c, str)})
        encoded: dict[str, dict] = {}
        with torch.no_grad():  # concept rows are constants of the run, also when the caller differentiates
            if texts:
                encoded = dict(zip(texts, adapter.encode(texts, arguments, device)))
            if any(not isinstance(c, str) for t in terms for c in t.concepts):
                probe = adapter.encode([""], arguments, device)[0]
                if set(probe) != {"encoder_hidden_states"}:
                    raise GuidanceError(
                        f"{name} conditions on more than token embeddings ({', '.join(map(str, probe))}); "
                        "give its guidance concepts as text"
                    )
        self.rows: list[list[dict]] = [
            [encoded[c] if isinstance(c, str) else {"encoder_hidden_states": c} for c in term.concepts]
            for term in terms
        ]

    def blocks(self, needed: Sequence[tuple[int, int]]) -> list[dict]:
        return [self.rows[ti][ci] for ti, ci in needed]


# -- schedule resolution ------------------------------------------------------------------------------


class RunSchedule:
    """The terms of one run, with fractional warm-ups resolved once the run's length is known."""

    def __init__(self, terms: Sequence):
        self.terms = list(terms)
        self.resolved = not any(callable(getattr(t, "for_schedule", None)) for t in self.terms)

    def resolve(self, total_evaluations: int) -> list:
        if not self.resolved:
            self.terms = for_schedule(self.terms, int(total_evaluations))
            self.resolved = True
        return self.terms

    def resolve_from(self, pipe) -> list:
        """Resolve against a pipeline's run: its ``_num_timesteps``, or the length of its scheduler's timesteps."""
        if self.resolved:
            return self.terms
        total = vars(pipe).get("_num_timesteps")
        if not total:
            timesteps = getattr(pipe.scheduler, "timesteps", None)
            total = 0 if timesteps is None else len(timesteps)
        return self.resolve(int(total))


# -- CFG detection ------------------------------------------------------------------------------------


class PipelineCfg:
    """Classifier-free guidance of a pipeline call, as its adapter reads it from the call and the pipeline."""

    def __init__(self, adapter, arguments: dict):
        self.adapter, self.arguments = adapter, arguments
        self.entry = True

    def at_entry(self) -> tuple[bool, str]:
        self.entry, reason = self.adapter.cfg_in_call(self.arguments)
        return self.entry, reason

    def now(self) -> bool:
        return self.adapter.cfg_now(self.arguments, self.entry)

    def scale(self) -> float:
        return self.adapter.guidance_scale(self.arguments)


class FixedCfg:
    """Classifier-free guidance set by the caller (the guided denoiser): always on, at a fixed scale."""

    entry = True

    def __init__(self, scale: float):
        self._scale = float(scale)

    def at_entry(self) -> tuple[bool, str]:
        return True, ""

    def now(self) -> bool:
        return True

    def scale(self) -> float:
        return self._scale


# -- row injection --------------------------------------------------------------------------------------


class RowInjection:
    """The denoiser's arguments with one block of `batch` rows per needed concept appended after its own rows."""

    def __init__(self, concepts: ConceptRows):
        self.concepts = concepts

    def __call__(self, adapter, kwargs: dict, text: slice, batch: int, needed: Sequence[tuple[int, int]]) -> dict:
        return adapter.extend(kwargs, text, self.concepts.blocks(needed), batch)


# -- combination --------------------------------------------------------------------------------------


@dataclass
class Observation:
    """What a term that declares ``observes`` sees of one denoiser evaluation besides the estimates.

    ``timestep``: the denoiser's own timestep argument (first sample). ``attention``: per concept of the
    term, its rows' cross-attention probabilities averaged over heads and layers, shape
    (batch, *spatial, tokens), or None (not evaluated at this step, or the family has no cross-attention
    to text). ``token_spans``: per concept, the positions of its own tokens (start and end tokens
    excluded; None for embeddings). ``factor``: the attention maps' resolution relative to the latents.
    """

    timestep: float | None = None
    attention: list[torch.Tensor | None] | None = None
    token_spans: list[slice | None] = field(default_factory=list)
    factor: int | None = None


class Combination:
    """Each term's correction Δ of the prompt's estimate, the terms' per-run state, and the step counter."""

    def __init__(self, terms: Sequence, prediction: str):
        self.prediction = prediction
        self.terms = list(terms)
        self.spaces = [resolve_space(getattr(t, "space", "auto"), prediction) for t in self.terms]
        self.states = [t.initial_state() for t in self.terms]
        self.step = 0
        self.evaluations = 0

    def set_terms(self, terms: Sequence) -> None:
        """The same terms after schedule resolution (same order, same states)."""
        self.terms = list(terms)

    def needed(self) -> list[tuple[int, int]]:
        return needed_concepts(self.terms, self.step)

    def estimates(self, needed, out: torch.Tensor, batch: int, skip: int) -> list[list]:
        """Per term, per concept, its estimate from the rows after the first `skip` blocks (None if not evaluated)."""
        per_term = [[None] * len(term.concepts) for term in self.terms]
        extra = out[skip * batch :].split(batch) if needed else ()
        for (ti, ci), estimate in zip(needed, extra):
            per_term[ti][ci] = estimate
        return per_term

    def correction(self, adapter, kw, uncond, text, per_term, batch, guidance_scale, observed=None) -> torch.Tensor:
        """Σ over terms of Δ, in the layout of the denoiser's output. `observed`: per term, its Observation or None."""
        u = adapter.to_math(uncond, kw)
        t = u if text is uncond else adapter.to_math(text, kw)
        concepts = [[None if e is None else adapter.to_math(e, kw) for e in est] for est in per_term]
        total = None
        for ti, term in enumerate(self.terms):
            seen = None if observed is None else observed[ti]

            def apply(u_, t_, c_, term=term, ti=ti, seen=seen):
                if seen is not None:
                    return term.apply_observed(u_, t_, c_, self.step, self.states[ti], guidance_scale, seen)
                return term.apply(u_, t_, c_, self.step, self.states[ti], guidance_scale)

            if self.spaces[ti] == "epsilon":
                delta, self.states[ti] = apply_in_epsilon(apply, adapter.epsilon_scale(kw, batch), u, t, concepts[ti])
            else:
                delta, self.states[ti] = apply(u, t, concepts[ti])
            total = delta if total is None else total + delta
        if total is None:  # only terms that act on the call itself (SAFREE): nothing to add to the estimate
            return torch.zeros_like(text)
        return adapter.from_math(total, kw, like=text)

    def advance(self) -> None:
        self.step += 1
        self.evaluations += 1


def observes(term) -> frozenset[str]:
    """What a term asks to observe of each evaluation ("timestep", "cross_attention"); empty for plain terms."""
    return frozenset(getattr(term, "observes", ()) or ())


class Observing:
    """The observations of a run's observing terms: the timestep, and cross-attention maps of their concept rows.

    A run whose terms need cross-attention on a denoiser without it is refused here, in one line.
    """

    def __init__(self, adapter, terms: Sequence, concepts: ConceptRows, name: str):
        self.wanted = [observes(t) for t in terms]
        self.observer: AttentionObserver | None = None
        self.token_spans: list[list[slice | None]] = [[] for _ in terms]
        if not any(self.wanted):
            return
        if any("cross_attention" in w for w in self.wanted):
            factor = attention_factor(adapter.model)
            if factor is None:
                raise GuidanceError(
                    f"{type(adapter.model).__name__} of {name} has no cross-attention to text, which "
                    f"{', '.join(type(t).__name__ for t, w in zip(terms, self.wanted) if 'cross_attention' in w)} "
                    "reads its masks from; use masking='noise'"
                )
            self.observer = AttentionObserver(adapter.model, factor)
        for ti, term in enumerate(terms):
            if "cross_attention" in self.wanted[ti]:
                self.token_spans[ti] = [
                    token_span(adapter.pipe, c, rows["encoder_hidden_states"].shape[0]) if isinstance(c, str) else None
                    for c, rows in zip(term.concepts, concepts.rows[ti])
                ]

    @property
    def active(self) -> bool:
        return any(self.wanted)

    def arm(self, needed, first_row: int, batch: int, adapter, kwargs: dict) -> None:
        """Capture the needed concept rows (from `first_row` on) of the denoiser call with arguments `kwargs`."""
        if self.observer is not None and any("cross_attention" in self.wanted[ti] for ti, _ in needed):
            spatial = adapter.to_math(kwargs[adapter.sample_arg][:1], kwargs).shape[2:]
            self.observer.arm(first_row, len(needed) * batch, spatial)

    def observations(self, needed, batch: int, kwargs: dict) -> list[Observation | None]:
        """Per term, what it observed of the evaluation that just ran (None for terms that observe nothing)."""
        timestep = kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor):
            timestep = float(timestep.flatten()[0]) if timestep.numel() else None
        maps = None
        if self.observer is not None and self.observer.armed:
            try:
                maps = dict(zip(needed, self.observer.maps(len(needed), batch)))
            finally:
                self.observer.disarm()
                self.observer.sums = None
        out: list[Observation | None] = []
        for ti, wanted in enumerate(self.wanted):
            if not wanted:
                out.append(None)
                continue
            attention = None
            if "cross_attention" in wanted:
                attention = [None if maps is None else maps.get((ti, ci)) for ci in range(len(self.token_spans[ti]))]
            out.append(
                Observation(
                    timestep=None if timestep is None else float(timestep),
                    attention=attention,
                    token_spans=self.token_spans[ti],
                    factor=None if self.observer is None else self.observer.factor,
                )
            )
        return out

    def set_offset(self, offset: int) -> None:
        if self.observer is not None:
            self.observer.set_offset(offset)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
