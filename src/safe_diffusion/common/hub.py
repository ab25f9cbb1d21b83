"""The errors a Hugging Face hub look-up raises when it cannot answer: offline, unknown or gated repository,
missing file, invalid id, network failure. Catch these, not every exception, around hub calls."""

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
