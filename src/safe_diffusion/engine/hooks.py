"""Call hooks: the engine's one mechanism for terms that act on the denoiser's call itself.

A guidance term (:class:`~safe_diffusion.guidance.terms.GuidanceTerm`) asks for concept rows and corrects
the prompt's estimate. Some methods instead change what the denoiser is conditioned on, or its
features: SAFREE (:mod:`.safree`) filters the prompt's own embedding rows per step and re-attends the
UNet's up-block features. Such a term's type is registered here (:func:`register_call_hook`) with two
functions, and the engine (:mod:`.core`) then

* calls ``check(term, pipe)`` on entering ``guide()`` (raise to refuse the pipeline, in one line);
* calls ``bind(term, pipe, adapter, arguments)`` at the start of each guided call, after the concept
  rows are encoded, and gets a :class:`CallHook` for that call (as diffusers' ``ModelHook``: a small
  object holding the call's state, separate from the term, which stays a config);
* at each guided denoiser evaluation passes the denoiser's keyword arguments, with the other terms'
  concept rows already appended, through :meth:`CallHook.before` with an :class:`Evaluation` saying
  which rows are which, and the evaluation's output, once the engine has combined it, through
  :meth:`CallHook.after`;
* calls :meth:`CallHook.close` when the call ends, whether it returned or raised.

Rows a hook appends come last; the engine keeps only the negative and prompt rows of the output, so
they never reach the pipeline. Hooks act on a pipeline call (they may read its prompt text):
:class:`~safe_diffusion.engine.GuidedDenoiser`, which is given embeddings, refuses them in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol


class Evaluation(NamedTuple):
    """Which denoiser evaluation a hook sees, and how its rows are laid out.

    ``kind`` is ``"batched"`` (rows ``[negative; prompt; concept rows…]``, `batch` each), or, for families
    whose pipeline makes two calls per step, ``"prompt"`` (``[prompt; concept rows…]``) and then
    ``"negative"`` (``[negative]``). ``step`` counts guided evaluations from 0.
    """

    step: int
    batch: int
    kind: str = "batched"


class CallHook(Protocol):
    """One guided call of a term registered with :func:`register_call_hook`."""

    def before(self, kwargs: dict, evaluation: Evaluation) -> dict | None:
        """The denoiser's keyword arguments for this evaluation as a new dict (tensors it changes are new
        tensors; rows it appends come last), or None to leave them."""

    def after(self, output: Any) -> Any | None:
        """The evaluation :meth:`before` prepared is over; `output` is what the pipeline will receive
        (None when the engine passes the denoiser's own output on). Return a new output, or None."""

    def close(self) -> None:
        """The call has ended (returned or raised)."""


class CallHookType(NamedTuple):
    check: Callable  # (term, pipe) -> None, raises to refuse the pipeline on entering guide()
    bind: Callable  # (term, pipe, adapter, arguments) -> CallHook for one call


#: Term type → how the engine checks and binds it. See :func:`register_call_hook`.
CALL_HOOKS: dict[type, CallHookType] = {}


def register_call_hook(term_type: type, check: Callable, bind: Callable) -> None:
    """Let ``guide()`` take terms of `term_type` that act on the call itself (see the module docstring)."""
    CALL_HOOKS[term_type] = CallHookType(check, bind)


def is_call_hook_term(term: Any) -> bool:
    return type(term) in CALL_HOOKS


def check_call_hook_terms(terms: Iterable, pipe) -> None:
    """Refuse, in one line, a pipeline one of the call-hook terms is not defined for."""
    for term in terms:
        if is_call_hook_term(term):
            CALL_HOOKS[type(term)].check(term, pipe)


def bind_call_hooks(terms: Sequence, pipe, adapter, arguments: dict) -> list[CallHook]:
    """One call's hooks, in the terms' order; those already bound are closed if a later one fails."""
    hooks: list[CallHook] = []
    try:
        for term in terms:
            if is_call_hook_term(term):
                hooks.append(CALL_HOOKS[type(term)].bind(term, pipe, adapter, arguments))
    except BaseException:
        close_call_hooks(hooks)
        raise
    return hooks


def hooks_before(hooks: Sequence[CallHook], kwargs: dict, evaluation: Evaluation) -> dict:
    for hook in hooks:
        changed = hook.before(kwargs, evaluation)
        if changed is not None:
            kwargs = changed
    return kwargs


def hooks_after(hooks: Sequence[CallHook], output: Any) -> Any:
    for hook in hooks:
        changed = hook.after(output)
        if changed is not None:
            output = changed
    return output


def close_call_hooks(hooks: Sequence[CallHook]) -> None:
    """Close every hook, even if one raises (the first error is raised after all are closed)."""
    error: BaseException | None = None
    for hook in hooks:
        try:
            hook.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once every hook is closed
            error = error or exc
    if error is not None:
        raise error
