"""What a mitigation costs in image quality and text alignment: CLIP score, FID and KID.

The numbers come from maintained libraries, not from formulas written here:

* **CLIP score** (Hessel et al., EMNLP 2021; torchmetrics' definition) of an image and its prompt:
  ``100 · max(cos(E_image, E_text), 0)`` with CLIP's projected embeddings, computed by torchmetrics'
  CLIP-score update. CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) by default; any transformers
  CLIP folder or hub id. Images get OpenAI CLIP's transform (:func:`safe_diffusion.judges.q16.clip_preprocess`,
  the one Q16 uses, identical with or without torchvision); prompts longer than the text tower's 77
  positions are truncated keeping the end-of-text token. The mean is the mean of per-image scores.
* **FID** (Heusel et al., NeurIPS 2017) and **KID** (Bińkowski et al., ICLR 2018; unbiased MMD² with the
  kernel ``(x·y/d + 1)³``, averaged over random subsets) of the images against a reference folder or
  precomputed statistics, computed by torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``. Features come from a swappable :class:`FeatureExtractor`; the default is
  torch-fidelity's InceptionV3 (``inception-v3-compat``, the 2015-12-05 TensorFlow weights, pool3, 2048-d),
  exactly as torchmetrics builds it, with torch-fidelity's TF1-compatible resize to 299.

Every image is decoded to RGB; for FID/KID it is centre-cropped to a square and resized with PIL's
bicubic filter to ``image_size`` (512 by default; a 512×512 image passes untouched) before the
extractor's own resize.

Long computations are batched and resumable: per-image results are persisted through :class:`Records`
as each fixed batch finishes, so a killed computation continues and ends with the numbers an
uninterrupted one gives (batches are cut from the full, ordered image list, never from what is left).
Reference statistics are cached on disk under a key made of the reference images' content and the
extractor's identity, so a second run does not recompute them.

torch-fidelity declares torchvision as a requirement, but only its CLIP/VGG/DINOv2 extractors and its
dataset helpers use it; its package ``__init__`` imports them all. Where torchvision is not installed,
:func:`import_torch_fidelity` imports the InceptionV3 modules without running that ``__init__``.
Inception weights are loaded weights-only (never unpickled), whatever torch-fidelity asks for.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import secrets
import shutil
import sys
import time
import types
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..common.errors import InputError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_IMAGE_SIZE = 512
DEFAULT_BATCH_SIZE = 32
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: torch.hub convention: the hex digits ending a weights file's name start its sha256. torch-fidelity's
#: ``weights-inception-2015-12-05-6726825d.pth`` (and pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``).
INCEPTION_SHA256_PREFIX = "6726825d"

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------------
# Libraries
# --------------------------------------------------------------------------------------------------


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


def _torchmetrics():
    import_torch_fidelity()
    try:
        import torchmetrics
    except ImportError as exc:
        raise InputError(f"quality metrics need torchmetrics ({exc}): pip install 'safe-diffusion[quality]'") from None
    return torchmetrics


def _clip_score_update():
    """torchmetrics' CLIP-score update: per-pair ``100 · cos`` (unclamped) for images and texts."""
    _torchmetrics()
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update as update

    return update


def quality_versions() -> dict[str, str]:
    """Versions of the libraries a quality number depends on (those installed)."""
    from ..common.outputs import library_versions

    versions = library_versions()
    for dist in ("torchmetrics", "torch-fidelity", "lightning-utilities", "numpy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _device(device) -> Any:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------


class Records:
    """Where a long computation keeps its per-image results, so that a killed run resumes where it stopped.

    A backend is two callables:

    * ``put(batch)`` stores ``batch``, a mapping ``{key: payload}`` (``str`` → JSON-ready ``dict`` of
      finite numbers and strings), **durably and all-or-nothing** before it returns: after a kill at
      any moment, either the whole batch is there or none of it. Putting a key again replaces it.
    * ``get()`` returns every record stored so far (by any process, in any earlier run) as
      ``{key: payload}``.

    Keys are namespaced by the computation (``features/<extractor id>/<size>/<image key>``,
    ``clip/<model id>/<image key>``), so one backend can serve several computations and a changed
    model or extractor never reuses stale records. A run store backs it with a stage of its record log
    (``Records(put=lambda b: log.append(("quality", k, v) for k, v in b.items()), get=lambda: log.get("quality"))``);
    :meth:`in_folder` backs it with files in a folder.
    """

    def __init__(self, put: Callable[[Mapping[str, dict]], None], get: Callable[[], Mapping[str, dict]]):
        self._put = put
        self._get = get

    def put(self, batch: Mapping[str, dict]) -> None:
        if batch:
            self._put(dict(batch))

    def get(self) -> dict[str, dict]:
        return dict(self._get())

    @classmethod
    def in_memory(cls) -> Records:
        store: dict[str, dict] = {}
        return cls(store.update, lambda: store)

    @classmethod
    def in_folder(cls, path: str | os.PathLike) -> Records:
        """Records as files in `path` (created if missing): one file per batch, written atomically."""
        backend = _FolderRecords(Path(path))
        return cls(backend.put, backend.get)


class _FolderRecords:
    """One JSON file per ``put`` (``<time ns>-<pid>-<random>.json``), written with a temporary file and a
    rename, so a file is whole or absent; several processes may write into the same folder. ``get``
    merges the files in name (time) order, later files winning; leftover temporary files are ignored."""

    SUFFIX = ".json"

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not path.is_dir():
            raise InputError(f"records folder {str(path)!r} is not a folder")

    def put(self, batch: Mapping[str, dict]) -> None:
        from ..common.outputs import atomic_write_bytes

        self.path.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{self.SUFFIX}"
        data = json.dumps({"schema_version": SCHEMA_VERSION, "records": batch}, allow_nan=False).encode()
        atomic_write_bytes(self.path / name, data)

    def get(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if not self.path.is_dir():
            return out
        for file in sorted(self.path.iterdir()):
            if file.name.startswith(".") or file.suffix != self.SUFFIX:
                continue
            try:
                doc = json.loads(file.read_bytes())
                out.update(doc["records"])
            except (ValueError, KeyError, TypeError):
                raise InputError(
                    f"records file {str(file)!r} is damaged (not written by safe-diffusion?); delete it to recompute"
                ) from None
        return out


def encode_vector(vector: np.ndarray) -> str:
    """A 1-d array as base64 of its float32 little-endian bytes (JSON-ready, exact for float32)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> np.ndarray:
    vector = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if vector.shape != (dim,):
        raise ValueError(f"expected {dim} values, found {vector.size}")
    return vector.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityImage:
    """One image to score: a stable key (a run's ``prompt-image`` key, or a path relative to a folder),
    its file, and its prompt (needed for the CLIP score only)."""

    key: str
    path: Path
    prompt: str | None = None


def folder_images(folder: str | os.PathLike, prompts: Mapping[str, str] | None = None) -> list[QualityImage]:
    """The images under `folder` (recursively, by suffix), keyed by their POSIX path relative to it, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise InputError(f"{str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts = prompts or {}
    images = []
    for p in files:
        key = p.relative_to(root).as_posix()
        images.append(QualityImage(key, p, prompts.get(key)))
    return images


def _fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _open_rgb(path: Path):
    from ..judges.base import decode_rgb

    return decode_rgb(path.read_bytes())


def square_resize(image, size: int):
    """Centre-crop a PIL image to a square (the shorter side) and resize it to ``size``×``size`` with PIL's
    bicubic filter; an image of that size already is returned unchanged."""
    from PIL import Image

    w, h = image.size
    if (w, h) == (size, size):
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.BICUBIC)


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "image file is missing"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"unreadable image: {reason}"


def _run_batches(
    items: Sequence[QualityImage],
    *,
    namespace: str,
    records: Records | None,
    batch_size: int,
    compute: Callable[[list[QualityImage]], tuple[dict[str, dict], dict[str, str]]],
    is_current: Callable[[QualityImage, dict], bool],
    stage: str,
    progress: ProgressFn | None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Run `compute` over fixed batches of `items`, skipping batches whose every item has a current record.

    Batches are cut from the whole ordered list (batch b is always items[b·n:(b+1)·n]), so a resumed
    computation feeds the model exactly the batches an uninterrupted one does; a batch is recomputed
    whole when any item of it lacks a record. Each computed batch is persisted before the next starts.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    stored = records.get() if records is not None else {}
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    total = len(items)
    reused = 0
    for start in range(0, total, batch_size):
        chunk = list(items[start : start + batch_size])
        cached = [stored.get(namespace + item.key) for item in chunk]
        if all(p is not None and is_current(item, p) for item, p in zip(chunk, cached, strict=True)):
            results.update({item.key: p for item, p in zip(chunk, cached, strict=True)})
            reused += len(chunk)
        else:
            payloads, errors = compute(chunk)
            if records is not None:
                records.put({namespace + key: payload for key, payload in payloads.items()})
            results.update(payloads)
            failed.update(errors)
        if progress is not None:
            progress(stage, min(start + batch_size, total), total)
    if reused:
        logger.info("%s: %d of %d images reused from earlier records", stage, reused, total)
    if failed:
        logger.warning("%s: %d of %d images could not be read", stage, len(failed), total)
    return results, failed


# --------------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------------


def _files_identity(folder: Path) -> dict[str, str]:
    from ..judges.base import file_sha256

    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    return {p.name: file_sha256(p) for p in weights}


def _tensor_to_pil(tensor):
    import torch
    from PIL import Image

    array = tensor.detach().cpu()
    if array.dtype != torch.uint8:
        raise TypeError("images must be uint8 tensors (3, H, W)")
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


class _ClipProcessor:
    """The processor torchmetrics calls: OpenAI CLIP's transform for images, the model's tokenizer with
    truncation to the text tower's positions (end-of-text token kept) for text."""

    def __init__(self, tokenizer, image_size: int, max_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_tokens = max_tokens

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **_):
        import torch

        from ..judges.q16 import clip_preprocess

        if images is not None:
            batch = np.stack([clip_preprocess(_tensor_to_pil(t), self.image_size) for t in images])
            return {"pixel_values": torch.from_numpy(batch)}
        tokens = self.tokenizer(
            list(text), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _clip_model_adapter(model):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors (what torchmetrics
    expects; transformers 5 returns an output object from them)."""
    import torch

    class ClipForTorchmetrics(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        @property
        def config(self):
            return self.clip.config

        @staticmethod
        def _tensor(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_image_features(self, pixel_values):
            return self._tensor(self.clip.get_image_features(pixel_values=pixel_values.to(self.clip.dtype)))

        def get_text_features(self, input_ids, attention_mask=None):
            return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    return ClipForTorchmetrics(model)


class ClipScorer:
    """CLIP score of (image, prompt) pairs with one CLIP model (see the module docstring)."""

    def __init__(self, model: str | os.PathLike = DEFAULT_CLIP_MODEL, *, device=None, dtype=None):
        import torch
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model_ref = str(model)
        self.device = _device(device)
        self.dtype = dtype or torch.float32
        try:
            clip = CLIPModel.from_pretrained(self.model_ref)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref)
        except Exception as exc:  # noqa: BLE001 -- offline hub, missing files, not a CLIP: one line
            hint = "" if Path(self.model_ref).exists() else " (offline? pass a local CLIP folder)"
            raise InputError(f"cannot load CLIP {self.model_ref!r}: {_first_line(exc)}{hint}") from None
        self.model = clip.to(self.device, self.dtype).eval()
        self.image_size = int(clip.config.vision_config.image_size)
        self.max_tokens = int(clip.config.text_config.max_position_embeddings)
        self._adapter = _clip_model_adapter(self.model)
        self._processor = _ClipProcessor(self.tokenizer, self.image_size, self.max_tokens)
        path = Path(self.model_ref)
        if path.is_dir():
            self._weights = {"weights_sha256": _files_identity(path)}
        else:
            self._weights = {"revision": getattr(clip.config, "_commit_hash", None)}

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "model": self.model_ref,
            **self._weights,
            "projection_dim": int(self.model.config.projection_dim),
            "dtype": str(self.dtype).replace("torch.", "") if isinstance(self.dtype, torch.dtype) else str(self.dtype),
            "definition": "100 * max(cos(image, text), 0) per image (torchmetrics CLIP score); mean of per-image",
            "implementation": "torchmetrics.functional.multimodal.clip_score._clip_score_update",
            "preprocessing": {
                "implementation": "safe_diffusion.judges.q16.clip_preprocess (OpenAI CLIP's transform)",
                "resize": f"shorter side to {self.image_size}, PIL bicubic",
                "crop": f"centre {self.image_size}x{self.image_size}",
            },
            "tokenizer": type(self.tokenizer).__name__,
            "truncation": f"{self.max_tokens} tokens, end-of-text token kept",
        }

    @property
    def identity(self) -> str:
        return _digest(self.describe())

    def raw_scores(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        """``100 · cos(image, text)`` (unclamped, float64) for PIL images and their prompts, one batch."""
        import torch

        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        if not images:
            return np.zeros(0)
        tensors = [
            torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).to(self.device)
            for im in images
        ]
        with torch.no_grad():
            score, _ = _clip_score_update()(tensors, [str(p) for p in prompts], self._adapter, self._processor)
        return score.detach().double().cpu().numpy().reshape(len(images))


def _prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def clip_scores(
    images: Sequence[QualityImage],
    scorer: ClipScorer,
    *,
    records: Records | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Per-image ``{"clip_score", "cosine"}`` for the images that have a prompt, and ``{key: reason}`` failures."""
    scored = [im for im in images if im.prompt is not None]
    namespace = f"clip/{scorer.identity[:16]}/"

    def compute(chunk: list[QualityImage]):
        decoded, keep, errors = [], [], {}
        for item in chunk:
            try:
                fingerprint = _fingerprint(item.path)
                decoded.append(_open_rgb(item.path))
                keep.append((item, fingerprint))
            except (OSError, ValueError) as exc:
                errors[item.key] = _unreadable(exc)
        raw = scorer.raw_scores(decoded, [item.prompt for item, _ in keep])
        payloads = {
            item.key: {
                "clip_score": float(max(value, 0.0)),
                "cosine": float(value / 100.0),
                "prompt_sha256": _prompt_digest(item.prompt),
                "file": fingerprint,
            }
            for (item, fingerprint), value in zip(keep, raw, strict=True)
        }
        return payloads, errors

    def is_current(item: QualityImage, payload: dict) -> bool:
        return payload.get("prompt_sha256") == _prompt_digest(item.prompt) and payload.get(
            "file"
        ) == _fingerprint_or_none(item.path)

    return _run_batches(
        scored,
        namespace=namespace,
        records=records,
        batch_size=batch_size,
        compute=compute,
        is_current=is_current,
        stage="clip score",
        progress=progress,
    )


def _fingerprint_or_none(path: Path) -> dict | None:
    try:
        return _fingerprint(path)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _weights_only_loading():
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
        _torchmetrics()
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
            with _weights_only_loading():
                net = NoTrainInceptionV3(
                    name="inception-v3-compat",
                    features_list=[str(self.num_features)],
                    feature_extractor_weights_path=str(path) if path.is_file() else None,
                    antialias=self.antialias,
                )
        except Exception as exc:  # noqa: BLE001 -- download, unpickling refused, wrong file: one line
            if weights is None and not path.is_file():
                raise InputError(
                    f"cannot download the Inception weights ({_first_line(exc)}); offline? copy "
                    f"{path.name} to {path.parent} or pass the file as the Inception weights"
                ) from None
            raise InputError(f"cannot load Inception weights {str(path)!r}: {_first_line(exc)}") from None
        from ..judges.base import file_sha256

        self.weights_sha256 = file_sha256(path)
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


def _random_extractor(**kwargs) -> FeatureExtractor:
    from ..testing.quality import RandomFeatureExtractor

    return RandomFeatureExtractor(**kwargs)


#: Feature extractors by name: ``inception`` (the standard), ``random`` (random weights, for tests and demos).
FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": InceptionV3Features,
    "random": _random_extractor,
}


def register_feature_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make `factory` available by `name`; it is called with keyword arguments (``device`` at least)."""
    FEATURE_EXTRACTORS[name] = factory


def make_feature_extractor(name: str = "inception", **kwargs) -> FeatureExtractor:
    if name not in FEATURE_EXTRACTORS:
        raise InputError(f"unknown feature extractor {name!r}; choose one of: {', '.join(sorted(FEATURE_EXTRACTORS))}")
    return FEATURE_EXTRACTORS[name](**kwargs)


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


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
    records: Records | None = None,
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
        decoded, keep, errors = [], [], {}
        for item in chunk:
            try:
                fingerprint = _fingerprint(item.path)
                decoded.append(square_resize(_open_rgb(item.path), image_size))
                keep.append((item, fingerprint))
            except (OSError, ValueError) as exc:
                errors[item.key] = _unreadable(exc)
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

    results, failed = _run_batches(
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


# --------------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class ReferenceStatistics:
    """Mean and covariance (float64) of a reference set's features, its size, and its features when known
    (KID needs them). ``extractor`` is the identity of the extractor that made them (None: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    features: np.ndarray | None
    extractor: str | None
    source: dict[str, Any]
    cache_hit: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            **self.source,
            "count": self.count,
            "has_features": self.features is not None,
            "extractor": self.extractor,
            "cache_hit": self.cache_hit,
        }


def statistics_from_features(features: np.ndarray, *, extractor: str | None, source: dict) -> ReferenceStatistics:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise InputError(f"reference statistics need at least 2 images with features (found {len(feats)})")
    return ReferenceStatistics(
        mu=feats.mean(axis=0),
        sigma=np.cov(feats, rowvar=False, ddof=1),
        count=len(feats),
        features=np.asarray(features, dtype=np.float32),
        extractor=extractor,
        source=source,
    )


def save_statistics(stats: ReferenceStatistics, path: str | os.PathLike) -> None:
    """Write `stats` as ``.npz`` (``mu``, ``sigma``, ``count``, ``features``, ``extractor``, ``source``), atomically.

    ``mu``/``sigma`` follow pytorch-fid's and clean-fid's convention, so other tools read the file too.
    """
    from ..common.outputs import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {"mu": stats.mu, "sigma": stats.sigma, "source": np.array(json.dumps(stats.source))}
    if stats.count is not None:
        arrays["count"] = np.array(stats.count, dtype=np.int64)
    if stats.features is not None:
        arrays["features"] = stats.features
    if stats.extractor is not None:
        arrays["extractor"] = np.array(stats.extractor)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_statistics(path: str | os.PathLike, extractor: FeatureExtractor | None = None) -> ReferenceStatistics:
    """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (ours, pytorch-fid's or clean-fid's); never unpickles."""
    from ..judges.base import file_sha256

    path = Path(path)
    name = str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"reference statistics {name!r} do not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: not a readable .npz of statistics ({_first_line(exc)})") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise InputError(f"{name}: missing array(s) {', '.join(missing)} (needs mu and sigma)")
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InputError(f"{name}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{name}: mu or sigma has non-finite values")
    recorded = str(arrays["extractor"]) if "extractor" in arrays else None
    if extractor is not None:
        if len(mu) != extractor.num_features:
            raise InputError(
                f"{name}: statistics are {len(mu)}-dimensional but the {extractor.name} extractor gives "
                f"{extractor.num_features}"
            )
        if recorded is not None and recorded != extractor.identity:
            raise InputError(
                f"{name}: statistics were computed with another feature extractor ({recorded[:12]}…, "
                f"this one is {extractor.identity[:12]}…); recompute them from the reference images"
            )
        if recorded is None:
            logger.warning("%s does not record its feature extractor; assuming it matches %s", name, extractor.name)
    features = np.asarray(arrays["features"], np.float32) if "features" in arrays else None
    if features is not None and features.shape[1:] != mu.shape:
        raise InputError(f"{name}: features have shape {features.shape}, not (n, {len(mu)})")
    count = int(arrays["count"]) if "count" in arrays else (len(features) if features is not None else None)
    source = {"kind": "statistics", "path": str(path), "sha256": file_sha256(path)}
    if "source" in arrays:
        with contextlib.suppress(ValueError):
            source["computed_from"] = json.loads(str(arrays["source"]))
    return ReferenceStatistics(mu, sigma, count, features, recorded, source)


def default_cache_dir() -> Path:
    """``$SAFE_DIFFUSION_CACHE/quality``, else ``$XDG_CACHE_HOME/safe-diffusion/quality`` (``~/.cache`` by default)."""
    if os.environ.get("SAFE_DIFFUSION_CACHE"):
        return Path(os.environ["SAFE_DIFFUSION_CACHE"]) / "quality"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safe-diffusion" / "quality"


def folder_content_digest(images: Sequence[QualityImage]) -> str:
    """sha256 over each image's key and the sha256 of its bytes (the reference's content, not its path)."""
    from ..judges.base import file_sha256

    digest = hashlib.sha256()
    for item in images:
        digest.update(f"{item.key}\t{file_sha256(item.path)}\n".encode())
    return digest.hexdigest()


def reference_statistics(
    reference: str | os.PathLike | ReferenceStatistics,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
) -> ReferenceStatistics:
    """Statistics of a reference folder of images (cached) or from a statistics ``.npz``.

    For a folder, the cache key is the digest of the images' content, the extractor's identity and
    `image_size`; a hit loads ``<cache>/fid-reference-<key>.npz`` without touching the extractor.
    A miss computes the features resumably (records in ``<cache>/fid-reference-<key>.records/``,
    removed once the statistics are written).
    """
    if isinstance(reference, ReferenceStatistics):
        return reference
    path = Path(reference)
    if path.is_file():
        return load_statistics(path, extractor)
    if not path.is_dir():
        raise InputError(f"FID reference {str(reference)!r} is neither a folder of images nor a statistics .npz file")
    images = folder_images(path)
    content = folder_content_digest(images)
    key = _digest(
        {
            "schema_version": SCHEMA_VERSION,
            "content": content,
            "extractor": extractor.identity,
            "image_size": image_size,
        }
    )[:40]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"fid-reference-{key}.npz"
    if cached.is_file():
        stats = load_statistics(cached, extractor)
        stats.cache_hit = True
        computed = stats.source.get("computed_from") or {}
        stats.source = {**computed, "path": str(path), "cache": str(cached), "cache_sha256": stats.source["sha256"]}
        logger.info("FID reference statistics from cache %s", cached)
        return stats
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cache folder {str(cache)!r} is not writable: {exc.strerror or exc}") from None
    records_dir = cache / f"fid-reference-{key}.records"
    feats = image_features(
        images,
        extractor,
        records=Records.in_folder(records_dir),
        batch_size=batch_size,
        image_size=image_size,
        progress=progress,
        stage="reference features",
    )
    source = {
        "kind": "folder",
        "path": str(path),
        "content_sha256": content,
        "images": len(images),
        "failed": len(feats.failed),
        "image_size": image_size,
    }
    stats = statistics_from_features(feats.features, extractor=extractor.identity, source=source)
    save_statistics(stats, cached)
    shutil.rmtree(records_dir, ignore_errors=True)
    stats.source = {**source, "cache": str(cached)}
    return stats


# --------------------------------------------------------------------------------------------------
# FID and KID
# --------------------------------------------------------------------------------------------------


def _passthrough(dim: int):
    """The 'feature extractor' handed to torchmetrics: features were extracted (and persisted) beforehand."""
    import torch

    class Precomputed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_features = dim

        def forward(self, x):
            return x

    return Precomputed()


def frechet_distance(features: np.ndarray, reference: ReferenceStatistics) -> float:
    """FID of `features` against `reference`, by torchmetrics' ``FrechetInceptionDistance`` (float64).

    The reference side of the metric's state is set from (mu, sigma, count): sum = n·mu and
    sum of outer products = (n−1)·sigma + n·mu·muᵀ, from which the metric recovers mu and sigma.
    """
    import torch

    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = np.asarray(features, dtype=np.float64)
    dim = len(reference.mu)
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise InputError(f"features are {feats.shape}, the reference is {dim}-dimensional")
    if len(feats) < 2:
        raise InputError(f"FID needs at least 2 images (found {len(feats)})")
    n = reference.count if reference.count and reference.count >= 2 else 2
    metric = FrechetInceptionDistance(feature=_passthrough(dim), reset_real_features=False, sync_on_compute=False)
    mu = torch.from_numpy(reference.mu.astype(np.float64))
    sigma = torch.from_numpy(reference.sigma.astype(np.float64))
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)
    metric.update(torch.from_numpy(feats), real=False)
    return float(metric.compute())


def kernel_distance(
    features: np.ndarray,
    reference: ReferenceStatistics,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, Any] | None:
    """KID (mean and std over `subsets` random subsets) by torchmetrics' ``KernelInceptionDistance`` (float64).

    The subset size is ``min(subset_size, images, reference images)``; subsets are drawn with torch's
    generator seeded with `seed` (the global generator's state is restored). None when the reference
    has no features (statistics files without them) or fewer than 2 images are on either side.
    """
    import torch

    if reference.features is None:
        return None
    feats = np.asarray(features, dtype=np.float64)
    size = min(int(subset_size), len(feats), len(reference.features))
    if size < 2:
        return None
    _torchmetrics()
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saves all extracted features in buffer": expected here
        metric = KernelInceptionDistance(
            feature=_passthrough(feats.shape[1]),
            subsets=int(subsets),
            subset_size=size,
            degree=KID_DEGREE,
            reset_real_features=False,
            sync_on_compute=False,
        )
    metric.update(torch.from_numpy(np.asarray(reference.features, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(feats), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "subsets": int(subsets), "subset_size": size, "seed": seed}


# --------------------------------------------------------------------------------------------------
# The whole computation
# --------------------------------------------------------------------------------------------------


@dataclass
class QualityResult:
    """Summary numbers, per-image CLIP scores, failures and the full provenance of one quality computation."""

    summary: dict[str, Any]
    per_image: dict[str, dict[str, float]]
    failed: dict[str, str]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            **self.summary,
            "failed": dict(sorted(self.failed.items())),
            "config": self.config,
            "per_image": self.per_image,
        }


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate_quality(
    images: Sequence[QualityImage],
    *,
    clip_model: str | os.PathLike | ClipScorer | None = DEFAULT_CLIP_MODEL,
    reference: str | os.PathLike | ReferenceStatistics | None = None,
    feature_extractor: str | FeatureExtractor = "inception",
    inception_weights: str | os.PathLike | None = None,
    records: Records | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int = DEFAULT_IMAGE_SIZE,
    device=None,
    clip_dtype=None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> QualityResult:
    """CLIP score of every image with a prompt (unless `clip_model` is None) and FID/KID against `reference`
    (unless it is None). Resumable through `records`; see the module docstring for the definitions."""
    images = list(images)
    if not images:
        raise InputError("no images to evaluate")
    if len({im.key for im in images}) != len(images):
        raise InputError("image keys must be unique")
    summary: dict[str, Any] = {"images": len(images)}
    per_image: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    config: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "batch_size": batch_size,
        "versions": quality_versions(),
    }

    if clip_model is not None:
        scorer = (
            clip_model
            if isinstance(clip_model, ClipScorer)
            else ClipScorer(clip_model, device=device, dtype=clip_dtype)
        )
        scored, errors = clip_scores(images, scorer, records=records, batch_size=batch_size, progress=progress)
        failed.update(errors)
        values = np.array([scored[im.key]["clip_score"] for im in images if im.key in scored], dtype=np.float64)
        for im in images:
            if im.key in scored:
                per_image[im.key] = {"clip_score": scored[im.key]["clip_score"]}
        summary["clip_score"] = _finite_or_none(float(values.mean())) if len(values) else None
        summary["clip_score_std"] = _finite_or_none(float(values.std())) if len(values) else None
        summary["clip_scored"] = len(values)
        summary["without_prompt"] = sum(1 for im in images if im.prompt is None)
        config["clip"] = scorer.describe()

    if reference is not None:
        if isinstance(feature_extractor, FeatureExtractor):
            extractor = feature_extractor
        elif feature_extractor == "inception":
            extractor = make_feature_extractor("inception", weights=inception_weights, device=device)
        else:
            extractor = make_feature_extractor(feature_extractor, device=device)
        stats = reference_statistics(
            reference, extractor, cache_dir=cache_dir, image_size=image_size, batch_size=batch_size, progress=progress
        )
        feats = image_features(
            images, extractor, records=records, batch_size=batch_size, image_size=image_size, progress=progress
        )
        failed.update(feats.failed)
        summary["fid"] = _finite_or_none(frechet_distance(feats.features, stats))
        kid = kernel_distance(feats.features, stats, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        summary["kid"] = _finite_or_none(kid["kid"]) if kid else None
        summary["kid_std"] = _finite_or_none(kid["kid_std"]) if kid else None
        summary["fid_images"] = len(feats.keys)
        config["fid"] = {
            "implementation": "torchmetrics.image.fid.FrechetInceptionDistance (float64)",
            "extractor": extractor.describe(),
            "extractor_identity": extractor.identity,
            "image_size": image_size,
            "resize": f"centre crop to a square, PIL bicubic to {image_size}x{image_size}",
            "reference": stats.describe(),
        }
        config["kid"] = {
            "implementation": "torchmetrics.image.kid.KernelInceptionDistance (float64)",
            "kernel": f"(x.y / d + 1)^{KID_DEGREE}",
            **(
                {k: kid[k] for k in ("subsets", "subset_size", "seed")}
                if kid
                else {"skipped": "the reference has no features" if stats.features is None else "fewer than 2 images"}
            ),
        }
    return QualityResult(summary, per_image, failed, config)


# --------------------------------------------------------------------------------------------------
# The harness stage: quality of a run's images, resumable in its run store
# --------------------------------------------------------------------------------------------------

#: Run-store stages: per-image records (CLIP scores, features; keys namespaced as above) and the result.
RECORDS_STAGE = "quality"
RESULT_STAGE = "quality-result"


def run_images(store) -> list[QualityImage]:
    """A run's generated images (of its current selection), keyed ``PPPPP-KKK``, each with its prompt."""
    from .store import image_key

    prompts = {p.index: p for p in store.selected_prompts()}
    n = store.images_per_prompt()
    images = []
    for (p, k), rec in sorted(store.images().items()):
        if p in prompts and k < n and store.image_problem(rec) is None:
            images.append(QualityImage(image_key(p, k), store.path / rec["image"], prompts[p].text))
    if not images:
        raise InputError(f"run {str(store.path)!r} has no generated images yet; run `eval run` first")
    return images


def store_records(store) -> Records:
    """:class:`Records` kept in the run store's ``quality`` stage (durable per batch, shared by processes)."""
    return Records(put=lambda batch: store.put_many(RECORDS_STAGE, batch.items()), get=lambda: store.get(RECORDS_STAGE))


def evaluate_run(store, **options: Any) -> QualityResult:
    """:func:`evaluate_quality` of a run's images, resumable in its store; the result is recorded in the run
    (stage ``quality-result``: summary and provenance, read by the trade-off report)."""
    from ..common.outputs import strict_json

    images = run_images(store)
    result = evaluate_quality(images, records=store_records(store), **options)
    store.put(
        RESULT_STAGE, "latest", strict_json({**result.summary, "failed": len(result.failed), "config": result.config})
    )
    return result


def run_quality(store) -> dict | None:
    """The quality result recorded in a run, or None."""
    return store.get(RESULT_STAGE).get("latest")
