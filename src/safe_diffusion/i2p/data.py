"""I2P prompt files: the bundled dataset, any CSV with the same columns, or the hub dataset.

Prompts are kept exactly as the file has them (``Null``, the four zero-width joiners U+200D and
the four prompts with line breaks included): they are what the model is given, and duplicates are
pooled by exact text when scoring.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity")
REQUIRED_COLUMNS = ("prompt", "categories", "sd_seed")
HUB_DATASET = "AIML-TUDA/i2p"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUNDLED_CSV = DATA_DIR / "i2p_benchmark.csv"
BUNDLED_CSV_SHA256 = "c5ab09e3f37a0f6f01899f8771495385ab68934fb844f6398a6dd12183a6dfbc"
Q16_PROMPTS = DATA_DIR / "q16_vit_l14_prompts.npy"
Q16_PROMPTS_SHA256 = "eb1426d84248dc6ed46b854e4b536a4d14fd2b9de89cd9e6ed3bbafd246d6f98"


@dataclass(frozen=True)
class Prompt:
    index: int  # 0-based row in the prompt file
    text: str
    categories: tuple[str, ...]
    sd_seed: int


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    source: str  # "bundled", "hub:AIML-TUDA/i2p" or a path
    sha256: str  # of the file's bytes


def parse_categories(value: str, where: str) -> tuple[str, ...]:
    """'sexual, violence' -> ('sexual', 'violence'); unknown or missing labels are a one-line error."""
    labels = tuple(dict.fromkeys(c.strip().lower() for c in str(value).split(",") if c.strip()))
    if not labels:
        raise InputError(f"{where}: no categories")
    unknown = [c for c in labels if c not in CATEGORIES]
    if unknown:
        raise InputError(f"{where}: unknown category {unknown[0]!r}; known: {', '.join(CATEGORIES)}")
    return labels


def parse_category_filter(values: list[str] | None) -> tuple[str, ...] | None:
    """--categories values (repeatable, or comma-separated) -> a validated tuple, or None for all."""
    if not values:
        return None
    return parse_categories(",".join(values), "--categories")


def decode_text_file(data: bytes, name: str) -> str:
    if not data.strip():
        raise InputError(f"{name} is empty")
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} is a binary file, not a CSV")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text") from None


def parse_prompt_csv(data: bytes, name: str, source: str | None = None) -> PromptSet:
    """Parse and validate a prompt CSV's bytes."""
    text = decode_text_file(data, name)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{name}: missing column(s) {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)})")
        prompts = []
        for i, row in enumerate(reader):
            where = f"{name} row {i}"
            if row.get("prompt") is None or row.get("sd_seed") is None:
                raise InputError(f"{where}: too few fields")
            cats = parse_categories(row["categories"], where)
            try:
                seed = int(float(row["sd_seed"]))
            except ValueError:
                raise InputError(f"{where}: sd_seed {row['sd_seed']!r} is not an integer") from None
            if seed < 0:
                raise InputError(f"{where}: sd_seed must be >= 0")
            prompts.append(Prompt(i, row["prompt"], cats, seed))
    except csv.Error as exc:
        raise InputError(f"{name}: not a readable CSV ({exc})") from None
    if not prompts:
        raise InputError(f"{name} has a header but no prompts")
    return PromptSet(prompts, source or name, hashlib.sha256(data).hexdigest())


def load_prompts(spec: str | Path | None = None) -> PromptSet:
    """The bundled I2P set (None / 'bundled'), the hub dataset ('hub' or 'hub:owner/name'), or a CSV path."""
    if spec is None or str(spec) == "bundled":
        data = BUNDLED_CSV.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != BUNDLED_CSV_SHA256:
            raise InputError(f"the bundled I2P CSV is damaged (sha256 {digest[:12]}…); reinstall safe-diffusion")
        return parse_prompt_csv(data, "bundled i2p_benchmark.csv", "bundled")
    spec = str(spec)
    if spec == "hub" or spec.startswith("hub:"):
        return load_hub_prompts(spec.partition(":")[2] or HUB_DATASET)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"prompt file {spec!r} does not exist")
    if not path.is_file():
        raise InputError(f"prompt file {spec!r} is not a file")
    return parse_prompt_csv(path.read_bytes(), spec, str(path.resolve()))


def load_hub_prompts(repo: str = HUB_DATASET) -> PromptSet:
    """Download ``i2p_benchmark.csv`` of the hub dataset (needs network, or a warm hub cache)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=repo, filename="i2p_benchmark.csv", repo_type="dataset")
    except Exception as exc:  # offline, unknown repo, auth: all mean "not available"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"cannot download the hub dataset {repo!r} ({first}); omit --prompts to use the bundled copy"
        ) from None
    return parse_prompt_csv(Path(path).read_bytes(), f"hub dataset {repo}", f"hub:{repo}")


def select(prompts: list[Prompt], categories: tuple[str, ...] | None, limit: int | None) -> list[Prompt]:
    """Prompts with any of `categories` (all when None), the first `limit` of them."""
    chosen = [p for p in prompts if categories is None or set(p.categories) & set(categories)]
    return chosen[:limit] if limit is not None else chosen


def load_q16_prompts():
    """The Q16 learned prompts, (2, 768) float16, loaded without pickle and checked against their hash."""
    import numpy as np

    data = Q16_PROMPTS.read_bytes()
    if hashlib.sha256(data).hexdigest() != Q16_PROMPTS_SHA256:
        raise InputError("the bundled Q16 prompts are damaged; reinstall safe-diffusion")
    return np.load(io.BytesIO(data), allow_pickle=False)
