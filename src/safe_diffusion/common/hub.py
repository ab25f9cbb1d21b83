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


#: How long :func:`go_offline_if_unreachable` waits for the hub before deciding there is no network.
REACH_TIMEOUT_S = 2.0


def go_offline_if_unreachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Without a network, every hub look-up spends tens of seconds in retries before it fails. Unless the user
    chose (``HF_HUB_OFFLINE`` set either way), try one connection to the hub's host; when it cannot be made
    within `timeout`, switch this process to offline mode, so that a missing model fails in seconds with the
    cache's answer. Returns True when it switched. Meant for the command line, once, before any hub call."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") is not None:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return False
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # huggingface_hub reads the variable at import; set its constant too if it is already imported
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True


def plain_hub_message(text: str) -> str:
    """A hub/diffusers error's first line without the advice that does not apply on a command line (there is
    no "stacktrace above" when the error is one line)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    for tail in (
        " Please check out the root cause in the stacktrace above.",
        "Please check out the root cause in the stacktrace above.",
    ):
        first = first.replace(tail, "")
    return first.strip()
