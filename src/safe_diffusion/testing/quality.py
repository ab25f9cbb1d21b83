"""Offline stand-ins for the quality metrics' networks: a random feature extractor and random Inception weights.

:class:`RandomFeatureExtractor` is a tiny convolutional network with seeded random weights, built the same
way in every process, so FID/KID plumbing (batching, persistence, resume, caching) is tested offline in
milliseconds. :func:`build_inception_weights` writes a random-weight state dict for torch-fidelity's
InceptionV3, so the real feature-extractor path (loading a local weights file, weights-only) runs offline.
Neither gives meaningful numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.hashing import sha256_bytes
from ..common.provenance import mark_random_weights
from ..evals.quality import FeatureExtractor, register_feature_extractor


class RandomFeatureExtractor(FeatureExtractor):
    """uint8 ``(N, 3, H, W)`` → resize to 32×32 (bilinear) → two stride-2 3×3 convolutions with ReLU → global
    average pool → linear → ``num_features``. Weights from ``torch.Generator().manual_seed(seed)``.

    `delay` (seconds slept after each batch) slows it down for kill-and-resume tests; it does not
    change the features, so it is not part of the identity.
    """

    name = "random"

    def __init__(self, num_features: int = 16, seed: int = 0, delay: float = 0.0, device=None):
        self.num_features = int(num_features)
        self.seed = int(seed)
        self.delay = float(delay)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(self.seed)
        shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "linear": (self.num_features, 32)}
        self.weights = {
            name: (torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5).to(self.device)
            for name, shape in shapes.items()
        }
        self.weights_sha256 = sha256_bytes(
            b"".join(
                name.encode() + self.weights[name].cpu().numpy().astype("<f4").tobytes()
                for name in sorted(self.weights)
            )
        )

    def describe(self) -> dict[str, Any]:
        return {
            "extractor": "random-conv",
            "seed": self.seed,
            "num_features": self.num_features,
            "weights_sha256": self.weights_sha256,
        }

    def features(self, images) -> np.ndarray:
        import torch.nn.functional as F

        with torch.no_grad():
            x = images.to(self.device, torch.float32) / 255.0
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            x = F.relu(F.conv2d(x, self.weights["conv1"], stride=2, padding=1))
            x = F.relu(F.conv2d(x, self.weights["conv2"], stride=2, padding=1))
            x = x.mean(dim=(2, 3)) @ self.weights["linear"].T
        if self.delay:
            time.sleep(self.delay)
        return x.cpu().numpy().astype(np.float32)


register_feature_extractor(
    "random", RandomFeatureExtractor, summary="seeded random-weight conv net (16-d), for tests and demos only"
)


def build_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save random weights for torch-fidelity's InceptionV3 (the FID network) at `path` (``torch.save`` of a
    state dict of tensors, loadable weights-only). Convolutions and the classifier get He-normal weights
    from a seeded generator, batch norms identity statistics, so activations neither vanish nor explode."""
    from unittest import mock

    from ..evals.quality import import_torch_fidelity

    if not import_torch_fidelity():
        raise RuntimeError("torch-fidelity is not installed")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    try:
        # Only the architecture's parameter names and shapes are wanted: skip loading the (empty) file.
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
            )
    finally:
        empty.unlink(missing_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in net.state_dict().items():
        if name.endswith("running_var") or (name.endswith(".weight") and tensor.ndim == 1):
            value = torch.ones_like(tensor)
        elif name.endswith("num_batches_tracked"):
            value = torch.zeros_like(tensor)
        elif tensor.ndim >= 2:
            fan_in = int(np.prod(tensor.shape[1:]))
            value = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * (2.0 / fan_in) ** 0.5
        else:
            value = torch.zeros_like(tensor)
        state[name] = value.contiguous()
    torch.save(state, path)
    return path


def build_imagenet_classifier(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random-weight ImageNet classifier with ``microsoft/resnet-50``'s layout (a ``ResNetForImageClassification``
    with 1000 classes and a ``ConvNextImageProcessor``), saved at `path`: the object judge's test model."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from .parts import seed_all

    path = Path(path)
    seed_all(seed)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=1000,
        id2label={i: f"class {i}" for i in range(1000)},
        label2id={f"class {i}": i for i in range(1000)},
    )
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():  # a spread of logits, so that the top-1 class varies from image to image
        model.classifier[-1].weight.normal_(0, 3.0)
    model.save_pretrained(path)
    ConvNextImageProcessor(
        size={"shortest_edge": image_size}, crop_pct=0.875, resample=3, do_normalize=True
    ).save_pretrained(path)
    mark_random_weights(path, "safe_diffusion.testing.build_imagenet_classifier", seed=seed)
    return path


def build_artist_classifier(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random-weight image classifier over 129 artist labels (``vincent-van-gogh`` among them), laid out as
    UnlearnDiffAtk's artist classifier (a transformers image-classification folder): the style judge's test model."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from .parts import seed_all

    path = Path(path)
    seed_all(seed)
    labels = ["vincent-van-gogh", "claude-monet", "pablo-picasso"] + [f"artist-{i}" for i in range(126)]
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # a spread of logits, so that the artist's rank varies from image to image
        model.classifier.weight.normal_(0, 3.0)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    mark_random_weights(path, "safe_diffusion.testing.build_artist_classifier", seed=seed)
    return path
