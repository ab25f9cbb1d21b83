"""The guidance engine: guidance terms run inside a pipeline's own denoiser calls.

``with guide(pipe, *terms): pipe(...)`` — the pipeline runs unchanged. Three pieces do the work:

* **One call, one state.** Inside the block the pipeline's class is a thin subclass whose
  ``__call__`` opens a :class:`_Call` for that call only: the concepts are encoded with the call's
  own arguments (``lora_scale``, ``clip_skip``, ``max_sequence_length``), the step counter and the
  terms' momenta start from zero, and the state lives in a :class:`contextvars.ContextVar` that is
  reset when the call returns or raises. A new denoising loop is therefore a new pipeline call,
  whatever the pipeline does inside it (no reliance on ``progress_bar``); two calls with the same
  seed give the same images; two threads each see their own call. The subclass's
  ``encode_prompt`` encodes one call's text at a time: a tokenizer shared by two pipelines is not
  safe to use from two threads at once (see ``_TEXT_LOCK``).
* **Hooks on the denoiser, owned by nobody.** Each denoiser component gets one forward pre-hook
  and one forward hook (torch module hooks, shared by every engine that serves the module and
  removed with the last one). They act only while a guided call of a pipeline that owns that
  denoiser is running in the current context, so a pipeline sharing the denoiser (``from_pipe``,
  ``**pipe.components``) is never guided by another's block. Torch hooks, not diffusers'
  ``HookRegistry``: the registry replaces ``module.forward``, which accelerate's model offloading
  also replaces and restores after every call (``maybe_free_model_hooks``), silently dropping a
  registry hook installed after it; torch hooks live beside ``forward`` and survive that. They
  are excluded from ``torch.compile`` tracing, so a compiled denoiser is compiled without them.
* **Rows ride along.** Where the pipeline batches classifier-free guidance in one call
  ([negative; prompt]: SD, SDXL, SD3, PixArt), the pre-hook appends one block of rows per needed
  concept (the prompt's latents and conditioning with the concept's text) and the hook folds
  each term's correction Δ into the prompt's estimate; the pipeline's own formula
  ε_∅ + s·(ε_p + Δ − ε_∅) then yields the guided estimate. Where the pipeline evaluates the prompt
  and the negative prompt in two calls, prompt first (FLUX and Qwen-Image true CFG, Wan), the
  concept rows ride with the prompt's call and Δ is added to the prompt's estimate once the
  negative estimate exists, in place, before the pipeline combines them. Either way there is no
  extra denoiser call per step.

Terms that act on the call itself rather than through concept rows (SAFREE) are served through call
hooks (:mod:`.hooks`): bound once per call, they rewrite the denoiser's arguments after the concept rows.

Steps count guided denoiser evaluations, as the reference pipelines count them (a second-order
scheduler such as Heun evaluates twice per step; terms can give warm-ups as fractions of the run
instead, see :meth:`~safe_diffusion.guidance.SafetyGuidance.for_schedule`).

Over 500 lines (just): the attachment (hooks, class swap, nesting) and one guided call's state machine
(batched, separate prompt/negative calls, auxiliary calls, call hooks) read together; the parts it drives
are :mod:`.parts`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ..common import stop
from ..common.errors import GuidanceError, GuidanceOffError
from ..guidance.terms import GuidanceTerm
from .adapters import DenoiserAdapter
from .hooks import (
    CallHook,
    Evaluation,
    bind_call_hooks,
    check_call_hook_terms,
    close_call_hooks,
    hooks_after,
    hooks_before,
    is_call_hook_term,
)
from .parts import Combination, ConceptRows, Observing, PipelineCfg, RowInjection, RunSchedule
from .support import served_denoisers

logger = logging.getLogger(__name__)

#: The guided pipeline call running in this context (thread, task), if any.
_CURRENT: ContextVar[_Call | None] = ContextVar("safe_diffusion_guided_call", default=None)
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline → its engine
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser → [pre handle, hook handle, users]
_GUIDED_CLASSES: dict[type, type] = {}
_LOCK = threading.RLock()
#: Held while a guided pipeline encodes text. A fast tokenizer keeps its padding and truncation
#: settings on its shared backend between the set-up and the encoding of each call, so two threads
#: encoding with one tokenizer (pipelines built from ``**pipe.components``) can get each other's
#: padding: one pipeline's prompt comes back 6 tokens long instead of 77.
_TEXT_LOCK = threading.RLock()


# -- the hooks ----------------------------------------------------------------------------------------


@torch.compiler.disable
def _before_denoiser(module, args, kwargs):
    stop.honour()  # a Ctrl-C or SIGTERM a library dropped: stop at this step, not at the batch's end
    call = _CURRENT.get()
    if call is None:
        return None
    return call.before(module, args, kwargs)


@torch.compiler.disable
def _after_denoiser(module, args, kwargs, output):
    call = _CURRENT.get()
    if call is None:
        return None
    return call.after(module, output)


def _hook(module) -> None:
    with _LOCK:
        entry = _HOOKS.get(module)
        if entry is None:
            pre = module.register_forward_pre_hook(_before_denoiser, with_kwargs=True)
            try:
                post = module.register_forward_hook(_after_denoiser, with_kwargs=True)
            except BaseException:
                pre.remove()
                raise
            entry = _HOOKS[module] = [pre, post, 0]
        entry[2] += 1


def _unhook(module) -> None:
    with _LOCK:
        entry = _HOOKS.get(module)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            entry[0].remove()
            entry[1].remove()
            del _HOOKS[module]


# -- the pipeline's call ----------------------------------------------------------------------------


def _guided_class(cls: type) -> type:
    """A subclass of `cls`, same name, whose ``__call__`` runs each call of a guided pipeline in its own state."""
    with _LOCK:
        sub = _GUIDED_CLASSES.get(cls)
        if sub is not None:
            return sub
        signature = inspect.signature(cls.__call__)

        def __call__(self, *args, **kwargs):
            engine = _ENGINES.get(self)
            if engine is None or not engine.terms:
                return cls.__call__(self, *args, **kwargs)
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:  # let the pipeline report its own argument error
                return cls.__call__(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)), None)  # self
            for name, param in signature.parameters.items():
                if param.kind is param.VAR_KEYWORD:
                    arguments.update(arguments.pop(name, {}))
            with engine.run(arguments):
                return cls.__call__(self, *args, **kwargs)

        __call__.__doc__ = cls.__call__.__doc__
        __call__.__signature__ = signature
        namespace = {"__call__": __call__, "__module__": cls.__module__}
        if callable(getattr(cls, "encode_prompt", None)):

            @functools.wraps(cls.encode_prompt)
            def encode_prompt(self, *args, **kwargs):
                with _TEXT_LOCK:
                    return cls.encode_prompt(self, *args, **kwargs)

            namespace["encode_prompt"] = encode_prompt
        sub = type(cls.__name__, (cls,), namespace)
        sub.__qualname__ = cls.__qualname__
        _GUIDED_CLASSES[cls] = sub
        return sub


class _Engine:
    """The terms attached to one pipeline, its denoisers' hooks, and its swapped class."""

    def __init__(self, pipe):
        found = served_denoisers(pipe)  # raises GuidanceError before anything changes
        self.pipe = pipe
        self.terms: list[GuidanceTerm] = []
        self.strict = 0
        self.modules = [module for _, module, _ in found]
        self.adapters: dict[int, DenoiserAdapter] = {id(m): a(pipe, n, m) for n, m, a in found}
        self.original_class = type(pipe)

    def attach(self) -> None:
        hooked = []
        try:
            for module in self.modules:
                _hook(module)
                hooked.append(module)
            object.__setattr__(self.pipe, "__class__", _guided_class(self.original_class))
            _ENGINES[self.pipe] = self
        except BaseException:
            for module in hooked:
                _unhook(module)
            object.__setattr__(self.pipe, "__class__", self.original_class)
            _ENGINES.pop(self.pipe, None)
            raise

    def detach(self) -> None:
        _ENGINES.pop(self.pipe, None)
        object.__setattr__(self.pipe, "__class__", self.original_class)
        for module in self.modules:
            _unhook(module)

    @property
    def adapter(self) -> DenoiserAdapter:
        return next(iter(self.adapters.values()))

    @contextmanager
    def run(self, arguments: dict) -> Iterator[_Call]:
        """One pipeline call with the terms attached now: its own state, cleared when the call ends."""
        call = _Call(self, arguments)
        try:
            call.start()
            token = _CURRENT.set(call)
            try:
                yield call
                call.finish()
            finally:
                _CURRENT.reset(token)
        finally:
            call.close()


#: Per pipeline, the warnings already given (a pipeline called in a loop says each once, not once per call).
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warn_once(pipe, key: str) -> bool:
    """Whether `key` is new for `pipe` (and now recorded)."""
    try:
        seen = _WARNED.setdefault(pipe, set())
    except TypeError:  # not weak-referenceable: warn every time rather than never
        return True
    if key in seen:
        return False
    seen.add(key)
    return True


class _Call:
    """One guided pipeline call: the run's named parts (:mod:`.parts`) driven by the denoiser's hooks.

    ``start`` detects CFG, encodes the concepts and binds the call hooks; ``before`` (the pre-hook) resolves
    the schedule once, injects the concept rows, arms the observers and passes the arguments through the
    call hooks; ``after`` (the post-hook) combines the estimates into the prompt's, counts the step and
    passes the output through the call hooks.
    """

    def __init__(self, engine: _Engine, arguments: dict):
        self.engine = engine
        self.pipe = engine.pipe
        self.arguments = arguments
        # Terms that act on the call itself (SAFREE: engine/hooks.py) are bound per call, not combined.
        self.call_terms = [t for t in engine.terms if is_call_hook_term(t)]
        self.hooks: list[CallHook] = []
        self.strict = engine.strict > 0
        adapter = engine.adapter
        self.prediction = adapter.prediction()
        self.schedule = RunSchedule([t for t in engine.terms if not is_call_hook_term(t)])
        self.cfg = PipelineCfg(adapter, arguments)
        self.combination = Combination(self.schedule.terms, self.prediction)
        self.concepts: ConceptRows | None = None
        self.injection: RowInjection | None = None
        self.observing: Observing | None = None
        self.active = True
        self.lost_warned = False
        self.pending: dict[int, tuple] = {}
        self.cond: dict | None = None  # separate calls: the prompt call's estimates, until the negative call
        self.last_delta: torch.Tensor | None = None  # the last batched evaluation's Δ, for an auxiliary call after it

    @property
    def name(self) -> str:
        return self.engine.original_class.__name__

    @property
    def terms(self) -> list:
        return self.combination.terms

    @property
    def step(self) -> int:
        return self.combination.step

    @property
    def states(self) -> list:
        return self.combination.states

    # -- start and end ---------------------------------------------------------------------------
    def start(self) -> None:
        adapter = self.engine.adapter
        cfg, reason = self.cfg.at_entry()
        if not cfg:
            message = (
                f"safety and semantic guidance need classifier-free guidance, which this {self.name} call "
                f"runs without ({reason})"
            )
            if adapter.separate_calls or self.strict:
                raise GuidanceOffError(message)
            if _warn_once(self.pipe, "cfg-off"):
                logger.warning("%s; running unguided (said once per pipeline)", message)
            else:
                logger.debug("%s; running unguided", message)
            self.active = False
            return
        terms = self.schedule.terms
        self.concepts = ConceptRows(adapter, terms, self.arguments, self.pipe._execution_device, self.name)
        self.injection = RowInjection(self.concepts)
        self.observing = Observing(adapter, terms, self.concepts, self.name)
        try:
            self.hooks = bind_call_hooks(self.call_terms, self.pipe, adapter, self.arguments)
        except BaseException:
            self.close()
            raise

    def finish(self) -> None:
        if self.active and self.combination.evaluations == 0:
            message = f"guidance never acted: {self.name} made no classifier-free-guidance denoiser call"
            if self.strict:
                raise GuidanceOffError(message)
            logger.warning(message)

    def close(self) -> None:
        hooks, self.hooks = self.hooks, []
        try:
            close_call_hooks(hooks)
        finally:
            if self.observing is not None:
                self.observing.close()

    def _cfg_lost(self) -> None:
        message = (
            f"classifier-free guidance was turned off during the {self.name} call (at guided step {self.step}); "
            "safety and semantic guidance cannot act on the remaining steps"
        )
        if self.strict:
            raise GuidanceOffError(message)
        if not self.lost_warned:
            logger.warning(message)
            self.lost_warned = True

    # -- inside the denoiser ---------------------------------------------------------------------
    def before(self, module, args, kwargs):
        adapter = self.engine.adapters.get(id(module))
        if adapter is None or not self.active:
            return None
        kw = adapter.as_kwargs(args, kwargs)
        if adapter.auxiliary(kw):
            # SD 3's skip-layer call: its estimate gets this step's Δ too, so that the pipeline's skip-layer term
            # s·(ε_p + Δ − ε_skip) stays s·(ε_p − ε_skip) and Δ is weighted by the CFG scale alone.
            if self.last_delta is not None:
                self.pending[id(module)] = ("auxiliary", self.last_delta)
            return None
        if adapter.separate_calls and self.cond is not None:
            # The prompt's call of this step came first; guidance cannot be switched off between the two.
            self.pending[id(module)] = ("negative", kw)
            if not self.hooks:
                return None
            out = hooks_before(self.hooks, kw, Evaluation(self.step, kw[adapter.sample_arg].shape[0], "negative"))
            return None if out is kw else ((), out)
        if not self.cfg.now():
            self._cfg_lost()
            return None
        if not self.schedule.resolved:
            self.combination.set_terms(self.schedule.resolve_from(self.pipe))
        rows = kw[adapter.sample_arg].shape[0]
        if adapter.separate_calls:
            batch, text, first = rows, slice(0, rows), rows
        else:
            if rows % 2:
                self._cfg_lost()
                return None
            batch, text, first = rows // 2, slice(rows // 2, rows), rows
        needed = self.combination.needed()
        kind = "prompt" if adapter.separate_calls else "batched"
        self.pending[id(module)] = (kind, kw, batch, needed)
        if adapter.separate_calls:
            self.cond = {}
        out = kw
        if needed:
            self.observing.arm(needed, first, batch, adapter, kw)
            out = self.injection(adapter, kw, text, batch, needed)
        if self.hooks:  # after the concept rows: rows a call hook appends come last
            out = hooks_before(self.hooks, out, Evaluation(self.step, batch, kind))
        return None if out is kw else ((), out)

    def after(self, module, output):
        pending = self.pending.pop(id(module), None)
        if pending is None:
            return None
        adapter = self.engine.adapters[id(module)]
        out = _output_tensor(output)
        if pending[0] == "auxiliary":
            delta, self.last_delta = pending[1], None
            return _replace_output(output, out + delta) if delta.shape == out.shape else None
        if pending[0] == "negative":
            cond = self.cond
            self.cond = None
            kept = _rows_kept(output, out, pending[1][adapter.sample_arg].shape[0])  # without rows hooks appended
            if cond is None or "text" not in cond:
                return self._after_hooks(kept)
            delta = self.combination.correction(
                adapter,
                cond["kw"],
                out,
                cond["text"],
                cond["estimates"],
                cond["batch"],
                self.cfg.scale(),
                cond["observed"],
            )
            cond["text"].add_(delta)  # the pipeline holds this tensor as the prompt's estimate
            self.combination.advance()
            return self._after_hooks(kept)
        kind, kw, batch, needed = pending
        if kind == "prompt":
            text = out[:batch]
            self.cond.update(
                kw=kw,
                batch=batch,
                text=text,
                estimates=self.combination.estimates(needed, out, batch, 1),
                observed=self._observed(needed, batch, kw),
            )
            return self._after_hooks(_rows_kept(output, out, batch))
        uncond, text = out[:batch], out[batch : 2 * batch]
        estimates = self.combination.estimates(needed, out, batch, 2)
        observed = self._observed(needed, batch, kw)
        delta = self.combination.correction(adapter, kw, uncond, text, estimates, batch, self.cfg.scale(), observed)
        self.combination.advance()
        self.last_delta = delta
        return self._after_hooks(_replace_output(output, torch.cat([uncond, text + delta])))

    def _observed(self, needed, batch, kw):
        return self.observing.observations(needed, batch, kw) if self.observing.active else None

    def _after_hooks(self, output):
        return hooks_after(self.hooks, output) if self.hooks else output


def _output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _rows_kept(output, out: torch.Tensor, rows: int):
    """`output` cut to its first `rows` rows (None: it has no others, the pipeline takes it as it is)."""
    return None if out.shape[0] == rows else _replace_output(output, out[:rows])


def _replace_output(output, tensor: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return type(output)(sample=tensor)


# -- the public entry points --------------------------------------------------------------------------


@contextmanager
def guide(pipe, *terms: GuidanceTerm, strict: bool = False) -> Iterator[Any]:
    """Make `pipe` apply the given guidance terms while inside the block; afterwards it is exactly as before.

    ``with guide(pipe, SafetyGuidance.from_preset("strong"), SemanticGuidance(["sunglasses"])): pipe(prompt)``.
    Blocks nest: an inner block adds its terms to the outer block's for its duration.

    A pipeline the engine cannot serve is refused here, in one line (:class:`~safe_diffusion.common.errors.GuidanceError`).
    With ``strict=True`` guidance that cannot act also raises :class:`~safe_diffusion.common.errors.GuidanceError`
    (a call without classifier-free guidance, guidance turned off mid-run, a call that never reached a
    guidance batch); otherwise it logs a warning and the call runs unguided. Pipelines whose
    classifier-free guidance is optional per call and off (FLUX or Qwen-Image without true CFG) always
    raise: guidance attached to them could never act.
    """
    for term in terms:
        if not isinstance(term, GuidanceTerm) and not is_call_hook_term(term):
            raise TypeError(f"{term!r} is not a guidance term")
    check_call_hook_terms(terms, pipe)  # refuse a pipeline a call-hook term is not defined for
    if not terms and _ENGINES.get(pipe) is None:
        yield pipe  # nothing to apply: the pipeline is left untouched
        return
    with _LOCK:
        engine = _ENGINES.get(pipe)
        owner = engine is None
        if owner:
            engine = _Engine(pipe)
            engine.attach()
        before = list(engine.terms)
        engine.terms = before + list(terms)
        engine.strict += int(strict)
    try:
        yield pipe
    finally:
        with _LOCK:
            engine.terms = before
            engine.strict -= int(strict)
            if owner:
                engine.detach()


@contextmanager
def guided_call(pipe, **arguments) -> Iterator[None]:
    """Run one call of `pipe` as a guided call, for code that calls the pipeline's ``__call__`` itself
    (``super().__call__`` in a subclass, as the drop-in pipelines do) inside a :func:`guide` block.

    `arguments` are the call's arguments (at least the guidance scale; also ``cross_attention_kwargs``,
    ``clip_skip`` …). Outside a guide block, or with no terms, it does nothing.
    """
    engine = _ENGINES.get(pipe)
    if engine is None or not engine.terms:
        yield
        return
    with engine.run(arguments):
        yield


def prediction_type(pipe) -> str | None:
    """What `pipe`'s denoiser predicts ("epsilon", "v_prediction", "flow", …), or None if guide() cannot serve it."""
    try:
        found = served_denoisers(pipe)
    except GuidanceError:
        return None
    name, module, adapter = found[0]
    return adapter(pipe, name, module).prediction()
