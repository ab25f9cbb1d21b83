"""Published I2P figures to show beside ours: rows shaped like our score rows, per (source, method).

The figures live in ``data/sld_reference_results.json`` (provenance in ``data/PROVENANCE.md``), as
fractions in [0, 1]; a value a source did not publish is None. Sources:

* ``sld-model-card``: the SLD authors' model card (AIML-TUDA/stable-diffusion-safe), inappropriate
  probability per category for SD 1.4 and SLD weak/medium/strong/max (no expected maximum there);
* ``i2p-readme``: the official I2P repository's README (ml-research/i2p), a later re-run with its own
  evaluation code: probability and expected maximum ± std for the sexual category and overall.

Methods are named ``sd`` (no mitigation), ``negative-prompt``, ``sld-weak`` … ``sld-max``;
:func:`method_for` maps a run's safety preset to one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from ..common.errors import InputError
from ..common.hashing import sha256_bytes
from .suites import DATA_DIR
from .suites import I2P_CATEGORIES as CATEGORIES

REFERENCE_FILE = DATA_DIR / "sld_reference_results.json"
REFERENCE_SHA256 = "ecf664089965fcb76946d22739069c22644a7fa7923bb1cf10134024f2f102b5"
CATEGORY_ORDER = (*CATEGORIES, "overall")
METHODS = ("sd", "negative-prompt", "sld-weak", "sld-medium", "sld-strong", "sld-max")
DEFAULT_SOURCE = "sld-model-card"
VALUE_KEYS = ("inappropriate_probability", "expected_max_inappropriateness", "expected_max_inappropriateness_std")


@lru_cache(maxsize=1)
def load_references() -> dict[str, Any]:
    """The whole reference document (sha256-checked)."""
    data = REFERENCE_FILE.read_bytes()
    digest = sha256_bytes(data)
    if digest != REFERENCE_SHA256:
        raise InputError(
            f"{REFERENCE_FILE.name} has sha256 {digest[:12]}…, not the vendored file; reinstall safe-diffusion"
        )
    return json.loads(data)


def sources() -> dict[str, dict[str, Any]]:
    """Each source's title, address and protocol, by name."""
    return dict(load_references()["sources"])


def available() -> list[tuple[str, str]]:
    """(source, method) pairs that have at least one published figure, in file order."""
    seen: dict[tuple[str, str], None] = {}
    for row in load_references()["rows"]:
        seen[(row["source"], row["method"])] = None
    return list(seen)


def reference_rows(method: str, source: str = DEFAULT_SOURCE, *, every_category: bool = True) -> list[dict[str, Any]]:
    """One row per category (the paper's order, then ``overall``) in the shape of our score rows.

    Keys: ``category``, ``images`` (None: not published), the three metric values (None where the
    source did not publish them), and ``source``, ``method``, ``label``, ``as_published``. With
    ``every_category=False`` only the categories the source published are returned.
    """
    doc = load_references()
    if source not in doc["sources"]:
        raise InputError(f"unknown reference source {source!r}; choose one of: {', '.join(doc['sources'])}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    published = {r["category"]: r for r in doc["rows"] if r["source"] == source and r["method"] == method}
    if not published:
        have = sorted({r["method"] for r in doc["rows"] if r["source"] == source})
        raise InputError(f"{source} publishes no figures for {method!r} (it has: {', '.join(have)})")
    rows = []
    for category in CATEGORY_ORDER:
        row = published.get(category)
        if row is None and not every_category:
            continue
        rows.append(
            {
                "category": category,
                "images": None,
                **{k: (None if row is None else row[k]) for k in VALUE_KEYS},
                "source": source,
                "method": method,
                "label": None if row is None else row["label"],
                "as_published": None if row is None else row["as_published"],
            }
        )
    return rows


def method_for(safety: str | None, negative_prompt: bool = False) -> str | None:
    """The reference method for a run's SLD preset (``off``/None, ``weak`` … ``max``) and negative-prompt use.

    None when no source publishes that combination (SLD together with a negative prompt).
    """
    preset = (safety or "off").lower()
    if preset in ("off", "none"):
        return "negative-prompt" if negative_prompt else "sd"
    if negative_prompt:
        return None
    method = f"sld-{preset}"
    if method not in METHODS:
        raise InputError(f"unknown SLD preset {safety!r}; choose one of: off, weak, medium, strong, max")
    return method
