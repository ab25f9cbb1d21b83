"""Load a diffusers pipeline from a hub id or a local folder, with errors a user can act on."""

from __future__ import annotations

import inspect
import json
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from .devices import default_device
from .errors import InputError
from .hub import load_errors

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(text: str) -> bool:
    """Whether `text` is shaped like a hub id ("owner/name")."""
    return bool(_HUB_ID.match(text))


def pipeline_class_name(model: str) -> str | None:
    """The ``_class_name`` a local checkpoint's model_index.json declares, or None for a hub id."""
    index = Path(model) / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError) as exc:
            raise InputError(f"model {model!r}: unreadable model_index.json ({exc})") from None
    return None


def check_model_reference(model: str) -> None:
    """Fail fast on a model that is neither a checkpoint folder nor something shaped like a hub id."""
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"model {model!r} is not a diffusers checkpoint folder (no model_index.json)")
        return
    if not is_hub_id(model):
        raise InputError(f"model {model!r} not found: no such folder, and not a hub id like 'owner/name'")


@contextmanager
def _quiet_loading():
    """Hide diffusers' and transformers' per-component loading bars; the denoising bar stays."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        # Back to what it was, and silently: with HF_HUB_DISABLE_PROGRESS_BARS=1 set, re-enabling makes
        # huggingface_hub warn on stderr, an extra line under a one-line error.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Cannot enable progress bars")
            if was[0]:
                diffusers_logging.enable_progress_bar()
            if was[1]:
                transformers_logging.enable_progress_bar()


def load_pipeline(model: str, *, device=None, dtype=None):
    """Load `model` as the plain diffusers pipeline its checkpoint names (``_class_name`` in
    ``model_index.json``: SD, SDXL, SD3, FLUX, PixArt, Qwen-Image, Wan, …); a checkpoint naming no known
    pipeline class loads as ``StableDiffusionXLPipeline`` ("XL" in its name) or ``StableDiffusionPipeline``.

    The pipeline applies no guidance of its own; attach guidance with :func:`safe_diffusion.guide`.
    No safety checker is loaded: guidance and the I2P classifiers do the safety work here.
    """
    import diffusers
    import torch

    check_model_reference(model)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    # the checkpoint's own pipeline class (SD, SDXL, SD3, FLUX, PixArt, Qwen-Image, Wan, …); guide() refuses
    # in one line a pipeline it cannot serve
    class_name = pipeline_class_name(model) or ""
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        cls = diffusers.StableDiffusionXLPipeline if "XL" in class_name else diffusers.StableDiffusionPipeline
    kwargs = {"dtype": dtype}
    parameters = inspect.signature(cls.__init__).parameters
    if "safety_checker" in parameters:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # a component the checkpoint was saved without ([null, null] in model_index.json: SD 3 without its T5, say)
    # is passed as None, as its author did when saving; diffusers would otherwise refuse it as missing
    from .provenance import read_config

    index = read_config(model, "model_index.json") or {}
    for name, entry in index.items():
        if name in parameters and isinstance(entry, list) and entry and all(e is None for e in entry):
            kwargs.setdefault(name, None)
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(model, **kwargs)
    except load_errors() as exc:  # hub, network, format and shape errors all mean "this model did not load"
        from .hub import plain_hub_message

        first = plain_hub_message(str(exc)) or type(exc).__name__
        hint = ""
        if is_hub_id(model) and not Path(model).exists():
            hint = " (--model: pass a local checkpoint folder, or download it where the hub is reachable)"
        raise InputError(f"cannot load model {model!r}: {first}{hint}") from None
    pipe.to(device)
    # Every job reports its own progress (common/progress: a bar on a terminal, periodic lines in logs);
    # diffusers' per-step bar would write carriage returns into logs.
    pipe.set_progress_bar_config(disable=True)
    return pipe
