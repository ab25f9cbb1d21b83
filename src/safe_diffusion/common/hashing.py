"""sha256, the one way this project fingerprints content: files, bytes, texts and JSON-ready values.

Every recorded hash is a lowercase hex sha256; a file is read in 4 MiB blocks, so hashing a checkpoint
of several GB needs no more memory than that.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

BLOCK = 1 << 22


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of `text` encoded as UTF-8 (lone surrogates from undecodable file names kept as bytes)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of `value`'s canonical JSON (sorted keys, no spaces): equal values, equal hashes."""
    return sha256_text(json.dumps(value, sort_keys=True, separators=(",", ":")))


def sha256_file(path: str | os.PathLike, block: int = BLOCK) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
