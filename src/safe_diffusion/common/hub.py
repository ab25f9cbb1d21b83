"""The errors that mean "this is not available here": a Hugging Face hub look-up that cannot answer (offline,
unknown or gated repository, missing file, invalid id, network failure) and a model that cannot be loaded.
Catch these, not every exception, around hub calls and ``from_pretrained``."""

from __future__ import annotations

from functools import cache


@cache
def hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the hub (or its local cache) could not give this": OSError covers HTTP,
    connection and offline-mode errors and a missing cache entry; ValueError an invalid repository id."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub import errors as hf_errors

        errors.append(hf_errors.EntryNotFoundError)
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)  # a transport error huggingface_hub lets through
    except ImportError:
        pass
    return tuple(errors)


@cache
def load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` raises when a model folder or hub id cannot be loaded: :func:`hub_errors`, a
    config it cannot read (KeyError, TypeError), weights of other shapes (RuntimeError), a damaged safetensors
    file."""
    errors: list[type[BaseException]] = [*hub_errors(), KeyError, TypeError, RuntimeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)
