"""Image features for FID and KID: the extractors, their registry, and resumable feature extraction.

The default extractor is torch-fidelity's InceptionV3 (``inception-v3-compat``, the 2015-12-05 TensorFlow
weights, pool3, 2048-d), exactly as torchmetrics builds it, with torch-fidelity's TF1-compatible resize
to 299. Others register by name in :data:`FEATURE_EXTRACTORS` (a :class:`~safe_diffusion.common.registry.Registry`:
``register_feature_extractor``, or the entry-point group ``safe_diffusion.feature_extractors``);
``safe_diffusion.testing`` registers its random-weight ``random`` extractor when it is imported.
"""

from __future__ import annotations

import base64
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...common.errors import InputError
from ...common.registry import Registry
from ...records.store import StageRecords
from .fidelity import import_torch_fidelity, load_torchmetrics, weights_only_loading
from .images import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMAGE_SIZE,
    ProgressFn,
    QualityImage,
    _device,
    _digest,
    _fingerprint_or_none,
    _first_line,
    load_chunk,
    run_batches,
    square_resize,
)

logger = logging.getLogger(__name__)

#: torch.hub convention: the hex digits ending a weights file's name start its sha256. torch-fidelity's
#: ``weights-inception-2015-12-05-6726825d.pth`` (and pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``).
INCEPTION_SHA256_PREFIX = "6726825d"


class FeatureExtractor(ABC):
    """Image features for FID and KID: uint8 RGB batches ``(N, 3, H, W)`` in, ``(N, num_features)`` out.

    :meth:`describe` says everything that determines the features (architecture, weights and their
    hash, resize); its digest, :attr:`identity`, keys cached reference statistics and persisted
    features. The device is not part of it.
    """

    name: ClassVar[str]
    num_features: int

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready: everything that determines the features."""

    @abstractmethod
    def features(self, images) -> np.ndarray:
        """float32 ``(N, num_features)`` for a uint8 tensor ``(N, 3, H, W)``."""

    @property
    def identity(self) -> str:
        return _digest(self.describe())


class InceptionV3Features(FeatureExtractor):
    """The standard FID features: torch-fidelity's InceptionV3 as torchmetrics builds it, pool3 (2048-d).

    `weights` is a local copy of the weights file; without it the file is taken from torch.hub's cache
    (``$TORCH_HOME/hub/checkpoints/``) and downloaded there from torch-fidelity's release on first use.
    ``antialias=False`` (default) keeps torch-fidelity's TF1-compatible bilinear resize to 299, as the
    original TensorFlow FID does; ``True`` uses torchmetrics' default antialiased resize instead.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None = None, *, device=None, antialias: bool = False):
        import torch

        if not import_torch_fidelity():
            raise InputError(
                "FID/KID with the standard Inception features need torch-fidelity: "
                "pip install --no-deps torch-fidelity==0.4.0 (see docs/quality.md)"
            )
        load_torchmetrics()
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.device = _device(device)
        self.antialias = bool(antialias)
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise InputError(f"Inception weights {str(weights)!r} is not a file")
            source = "local file"
        else:
            path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
            source = URL_INCEPTION_V3
        try:
            with weights_only_loading():
                net = NoTrainInceptionV3(
                    name="inception-v3-compat",
                    features_list=[str(self.num_features)],
                    feature_extractor_weights_path=str(path) if path.is_file() else None,
                    antialias=self.antialias,
                )
        except Exception as exc:  # noqa: BLE001 - download, file and unpickling-refused errors of every kind: one line
            if weights is None and not path.is_file():
                raise InputError(
                    f"cannot download the Inception weights ({_first_line(exc)}); offline? copy "
                    f"{path.name} to {path.parent} or pass the file with --inception-weights"
                ) from None
            raise InputError(f"cannot load Inception weights {str(path)!r}: {_first_line(exc)}") from None
        from ...common.hashing import sha256_file

        self.weights_sha256 = sha256_file(path)
        if not self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX):
            logger.warning(
                "Inception weights %s are not the published file (sha256 %s…): FID/KID are not comparable "
                "with published figures",
                path.name,
                self.weights_sha256[:12],
            )
        self.weights_file = path.name
        self.source = source
        self.net = net.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            "extractor": "inception-v3-compat",
            "implementation": "torch-fidelity FeatureExtractorInceptionV3 via torchmetrics NoTrainInceptionV3",
            "layer": "2048 (pool3)",
            "weights": {
                "file": self.weights_file,
                "sha256": self.weights_sha256,
                "source": self.source,
                "published": self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX),
            },
            "resize_to_299": "bilinear, antialiased (torchmetrics)"
            if self.antialias
            else "TF1-compatible bilinear (torch-fidelity)",
            "input": "uint8 RGB",
        }

    def features(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.net(images.to(self.device))
        return out.float().cpu().numpy()


#: Feature extractors by name: ``inception`` (the standard); ``random`` once ``safe_diffusion.testing`` is
#: imported (random weights, for tests and demos). Each entry is a factory called with keyword arguments.
FEATURE_EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature_extractors", what="feature extractor")
FEATURE_EXTRACTORS.register(
    "inception", InceptionV3Features, summary="torch-fidelity's InceptionV3, pool3 (the standard FID features)"
)


def register_feature_extractor(name: str, factory: Callable[..., FeatureExtractor], *, summary: str = "") -> None:
    """Make `factory` available by `name` (replacing an earlier one); it is called with keyword arguments
    (``device`` at least)."""
    FEATURE_EXTRACTORS.register(name, factory, summary=summary, replace=True)


def make_feature_extractor(name: str = "inception", **kwargs) -> FeatureExtractor:
    return FEATURE_EXTRACTORS.get(name)(**kwargs)


def encode_vector(vector: np.ndarray) -> str:
    """A 1-d array as base64 of its float32 little-endian bytes (JSON-ready, exact for float32)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> np.ndarray:
    vector = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if vector.shape != (dim,):
        raise ValueError(f"expected {dim} values, found {vector.size}")
    return vector.astype(np.float32)


@dataclass
class FeatureSet:
    """Features of the images that could be read, in the order of the input, and why the others failed."""

    keys: list[str]
    features: np.ndarray
    failed: dict[str, str] = field(default_factory=dict)


def _uint8_batch(images):
    import torch

    return (
        torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).contiguous()
    )


def image_features(
    images: Sequence[QualityImage],
    extractor: FeatureExtractor,
    *,
    records: StageRecords | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: ProgressFn | None = None,
    stage: str = "features",
) -> FeatureSet:
    """Features of `images` (resumable through `records`)."""
    if image_size < 1:
        raise InputError(f"image size must be at least 1, not {image_size}")
    dim = int(extractor.num_features)
    namespace = f"features/{extractor.identity[:16]}/{image_size}/"

    def compute(chunk: list[QualityImage]):
        decoded, keep, errors = load_chunk(chunk, lambda image: square_resize(image, image_size))
        if not decoded:
            return {}, errors
        feats = np.asarray(extractor.features(_uint8_batch(decoded)), dtype=np.float32)
        if feats.shape != (len(decoded), dim) or not np.isfinite(feats).all():
            raise RuntimeError(
                f"feature extractor returned {feats.shape} (expected {(len(decoded), dim)}) or non-finite"
            )
        payloads = {
            item.key: {"features": encode_vector(f), "dim": dim, "file": fingerprint}
            for (item, fingerprint), f in zip(keep, feats, strict=True)
        }
        return payloads, errors

    def is_current(item: QualityImage, payload: dict) -> bool:
        return payload.get("dim") == dim and payload.get("file") == _fingerprint_or_none(item.path)

    results, failed = run_batches(
        images,
        namespace=namespace,
        records=records,
        batch_size=batch_size,
        compute=compute,
        is_current=is_current,
        stage=stage,
        progress=progress,
    )
    keys = [im.key for im in images if im.key in results]
    if keys:
        matrix = np.stack([decode_vector(results[k]["features"], dim) for k in keys])
    else:
        matrix = np.zeros((0, dim), dtype=np.float32)
    return FeatureSet(keys, matrix, failed)
