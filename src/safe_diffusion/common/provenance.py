"""What a model *is*, independent of how its path was spelled: identity by content, and its native size.

A run records the model it used and refuses to resume with another. Comparing the ``--model``
string is wrong both ways: ``./ckpt`` and ``/abs/ckpt`` are the same model, while a different
checkpoint saved under the same path is not. So:

* a local checkpoint folder is identified by ``sha256:<digest>`` over the sorted list of its files
  (relative path and sha256 of each; hidden files and ``erasure.json`` excluded). Hashing a few GB
  takes seconds, so each file's digest is cached in ``$XDG_CACHE_HOME/safe-diffusion/file-hashes.json``
  keyed by resolved path, size and modification time (a rewritten file is hashed again);
* a hub id is identified by ``hub:<owner/name>@<commit>``: the commit of the local cache's ``main``
  when the hub is unreachable, else the hub's current one.

:func:`native_size` reads the UNet's ``sample_size`` and the VAE's downsampling from the configs
without loading weights (the official I2P code passes no size, so SD 2.x 768-v models make 768×768).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .hashing import sha256_file, sha256_text
from .hub import hub_errors
from .outputs import atomic_write_json

logger = logging.getLogger(__name__)

EXCLUDED = {"erasure.json"}

#: The file :mod:`safe_diffusion.testing`'s builders leave in every model folder they make: its weights are
#: random, so any figure measured with it is noise (reports name such models wherever their numbers appear).
RANDOM_WEIGHTS_FILE = "random_weights.json"


def random_weights(model: str | os.PathLike | None) -> bool:
    """Whether the model folder `model` has random weights: it carries :data:`RANDOM_WEIGHTS_FILE`, or it was
    erased from a model that does (its ``erasure.json`` names the base). False for hub ids and unknown paths."""
    if not model:
        return False
    path = Path(model)
    try:
        if (path / RANDOM_WEIGHTS_FILE).is_file():
            return True
        record = path / "erasure.json"
        if record.is_file():
            base = (json.loads(record.read_text()).get("base_model") or {}).get("path")
            return bool(base) and Path(base) != path and (Path(base) / RANDOM_WEIGHTS_FILE).is_file()
    except (OSError, ValueError, AttributeError):
        return False
    return False


def mark_random_weights(folder: str | os.PathLike, builder: str, **settings) -> None:
    """Leave :data:`RANDOM_WEIGHTS_FILE` in `folder`: its model was built with random weights by `builder`."""
    from .outputs import atomic_write_json

    atomic_write_json(
        Path(folder) / RANDOM_WEIGHTS_FILE,
        {
            "random_weights": True,
            "builder": builder,
            **settings,
            "note": "built offline with random weights for tests and demos: its outputs and scores are noise",
        },
    )


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safe-diffusion" / "file-hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError as exc:  # a read-only home only costs speed
        logger.debug("cannot write the hash cache %s: %s", path, exc)


def file_sha256(path: Path, cache: dict | None = None) -> str:
    """sha256 of a file's bytes, from `cache` when its (path, size, mtime) is unchanged."""
    resolved = str(path.resolve())
    st = path.stat()
    key = f"{resolved}|{st.st_size}|{st.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    value = sha256_file(path)
    if cache is not None:
        cache[key] = value
    return value


def folder_identity(folder: str | os.PathLike) -> str:
    """``sha256:<hex>`` over (relative path, file sha256) of every file of a checkpoint folder."""
    root = Path(folder)
    cache = _load_cache()
    before = len(cache)
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or rel.as_posix() in EXCLUDED:
            continue
        entries.append(f"{rel.as_posix()}\t{file_sha256(path, cache)}")
    if len(cache) != before:
        _save_cache(cache)
    return "sha256:" + sha256_text("\n".join(entries))


def hub_revision(repo: str) -> str | None:
    """The commit a hub id resolves to: the cached ``main`` offline, the hub's own otherwise."""
    try:
        from huggingface_hub import HfApi, constants

        if not constants.HF_HUB_OFFLINE:
            try:
                return HfApi().model_info(repo).sha
            except hub_errors():  # unreachable, unknown or gated: fall back to the cache
                pass
        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip()
    except ImportError:
        pass
    return None


def model_identity(model: str) -> dict:
    """``{"reference", "identity", "kind"}`` of a checkpoint folder or a hub id."""
    path = Path(model)
    if path.is_dir():
        return {"reference": str(path.resolve()), "identity": folder_identity(path), "kind": "folder"}
    revision = hub_revision(model)
    return {"reference": model, "identity": f"hub:{model}@{revision or 'unknown'}", "kind": "hub"}


def read_config(model: str, name: str) -> dict | None:
    """The JSON file `name` (e.g. ``"unet/config.json"``) of a checkpoint folder or hub id; None when unavailable."""
    path = Path(model)
    try:
        if path.is_dir():
            file = path / name
            return json.loads(file.read_text()) if file.is_file() else None
        from huggingface_hub import hf_hub_download

        sub, _, filename = name.rpartition("/")
        return json.loads(Path(hf_hub_download(model, filename, subfolder=sub or None)).read_text())
    except (*hub_errors(), UnicodeDecodeError) as exc:  # offline, unknown repo, unreadable: the caller says what
        # it needs
        logger.debug("cannot read %s of %s: %s", name, model, exc)
        return None


def native_size(model: str) -> tuple[int, int] | None:
    """(height, width) a checkpoint generates at by default, from its configs; None when unknown."""
    unet = read_config(model, "unet/config.json")
    vae = read_config(model, "vae/config.json")
    if not unet or "sample_size" not in unet:
        return None
    blocks = (vae or {}).get("block_out_channels") or [0, 0, 0, 0]
    factor = 2 ** (len(blocks) - 1)
    size = unet["sample_size"]
    if isinstance(size, (list, tuple)):
        return int(size[0]) * factor, int(size[1]) * factor
    return int(size) * factor, int(size) * factor
