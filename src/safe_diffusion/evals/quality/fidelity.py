"""torch-fidelity and torchmetrics, imported the way this package needs them.

torch-fidelity declares torchvision as a requirement, but only its CLIP/VGG/DINOv2 extractors and its
dataset helpers use it; its package ``__init__`` imports them all. Where torchvision is not installed,
:func:`import_torch_fidelity` imports the InceptionV3 modules without running that ``__init__``.
Inception weights are loaded weights-only (never unpickled), whatever torch-fidelity asks for
(:func:`weights_only_loading`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import types
from importlib import metadata

from ...common.errors import InputError

logger = logging.getLogger(__name__)


def _caused_by_torchvision(exc: BaseException) -> bool:
    name = getattr(exc, "name", None) or ""
    return name == "torchvision" or name.startswith("torchvision.") or "torchvision" in str(exc)


def import_torch_fidelity() -> bool:
    """Make ``torch_fidelity.feature_extractor_inceptionv3`` importable; False when torch-fidelity is absent.

    Must run before torchmetrics is imported (torchmetrics' FID module imports torch-fidelity's
    InceptionV3 at import time). When the whole package imports, nothing is changed. When it fails
    because torchvision is missing or broken, ``torch_fidelity`` is registered as a bare package (its
    submodules importable, its ``__init__`` not run): the InceptionV3 extractor, its helpers and the
    TF1-compatible resize import nothing from torchvision.
    """
    if "torch_fidelity" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return False
    try:
        import torch_fidelity  # noqa: F401

        return True
    except (ImportError, OSError, RuntimeError) as exc:
        if not _caused_by_torchvision(exc):
            raise
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations or [])
    package.__file__ = spec.origin
    package.__spec__ = spec
    package.__package__ = "torch_fidelity"
    sys.modules["torch_fidelity"] = package
    logger.debug("torchvision unavailable: torch-fidelity's InceptionV3 imported without its package __init__")
    return True


def load_torchmetrics():
    import_torch_fidelity()
    try:
        import torchmetrics
    except ImportError as exc:
        raise InputError(f"quality metrics need torchmetrics ({exc}): pip install 'safe-diffusion[quality]'") from None
    return torchmetrics


def _clip_score_update():
    """torchmetrics' CLIP-score update: per-pair ``100 · cos`` (unclamped) for images and texts."""
    load_torchmetrics()
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update as update

    return update


def quality_versions() -> dict[str, str]:
    """Versions of the libraries a quality number depends on (those installed)."""
    from ...common.outputs import library_versions

    versions = library_versions()
    for dist in ("torchmetrics", "torch-fidelity", "lightning-utilities", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


@contextlib.contextmanager
def weights_only_loading():
    """Force ``torch.load`` to load weights only (no unpickling) inside the block, whatever its caller asks.

    torch-fidelity loads its InceptionV3 weights with ``weights_only=False``; torch honours
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` over that argument. The variable is set for the block only.
    """
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
