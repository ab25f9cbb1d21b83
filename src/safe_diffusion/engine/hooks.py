"""Call hooks: how ``guide()`` serves terms that act on the pipeline call itself rather than through concept rows.

A guidance term (:class:`~safe_diffusion.guidance.terms.GuidanceTerm`) asks for concept rows and corrects
the prompt's estimate. Some methods instead change what the denoiser is conditioned on, or its
features: SAFREE (:mod:`.safree`) filters the prompt's own embedding rows per step and re-attends the
UNet's up-block features. Such a term's type is registered here with two functions; the engine
(:mod:`.core`) then

* calls ``check(term, pipe)`` on entering ``guide()`` (raise to refuse the pipeline, in one line);
* calls ``bind(term, pipe, adapter, arguments)`` at the start of each guided call, after the concept
  rows are encoded, and gets a :class:`CallHook` for that call;
* at each guided denoiser evaluation passes the denoiser's keyword arguments, with the other terms'
  concept rows already appended, through :meth:`CallHook.before`, and calls :meth:`CallHook.after`
  when that evaluation returns;
* calls :meth:`CallHook.close` when the call ends, whether it returned or raised.

Rows a hook appends come last; the engine keeps only the negative and prompt rows of the output, so
they never reach the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol


class CallHook(Protocol):
    """One guided call of a term registered in :data:`CALL_HOOKS`."""

    def before(self, kwargs: dict, step: int, batch: int) -> dict:
        """The denoiser's keyword arguments for this evaluation ([negative; prompt; concept rows…], `batch` rows
        each), as a new dict: tensors it changes are new tensors; rows it appends come last."""

    def after(self) -> None:
        """The evaluation :meth:`before` prepared is over."""

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
