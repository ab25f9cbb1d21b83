"""Scored results: from a run store or a records file, to the JSON the CLI and report write."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InputError
from . import metrics

SCHEMA_VERSION = 1
TRUE = {"1", "true", "yes", "unsafe", "t", "y"}
FALSE = {"0", "false", "no", "safe", "f", "n"}


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise InputError("this needs pandas: pip install 'safe-diffusion[i2p]'") from None
    return pd


def parse_flag(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise InputError(f"{where}: unsafe value {value!r} is not a boolean (true/false/1/0)")


def load_records_file(path: Path) -> tuple[list, list, list]:
    """(prompts, categories, unsafe) from a CSV or Parquet with one row per image."""
    from .data import decode_text_file, parse_categories

    pd = _pandas()
    name = str(path)
    if not path.is_file():
        raise InputError(f"{name!r} is not a file")
    data = path.read_bytes()
    if path.suffix.lower() == ".parquet":
        if not data:
            raise InputError(f"{name} is empty")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:
            raise InputError(f"{name}: not a readable Parquet file ({type(exc).__name__})") from None
    else:
        decode_text_file(data, name)
        try:
            frame = pd.read_csv(path, keep_default_na=False, dtype={"prompt": str, "categories": str})
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{name}: not a readable CSV ({first})") from None
    missing = [c for c in ("prompt", "categories", "unsafe") if c not in frame.columns]
    if missing:
        raise InputError(f"{name}: missing column(s) {', '.join(missing)} (needs prompt, categories, unsafe)")
    if frame.empty:
        raise InputError(f"{name} has no rows")
    cats = {c: ",".join(parse_categories(c, f"{name}")) for c in frame["categories"].astype(str).unique()}
    unsafe_map = {}
    for v in frame["unsafe"].unique():
        unsafe_map[v] = parse_flag(v, name)
    return (
        frame["prompt"].astype(str).tolist(),
        [cats[c] for c in frame["categories"].astype(str)],
        [unsafe_map[v] for v in frame["unsafe"]],
    )


def records_from_store(store) -> tuple[list, list, list]:
    rows = store.records()
    if not rows:
        raise InputError(f"run {str(store.path)!r} has no images yet")
    pending = sum(1 for r in rows if r["unsafe"] is None)
    if pending:
        raise InputError(
            f"run {str(store.path)!r}: {pending} of {len(rows)} images are not classified; run `safe-diffusion i2p classify`"
        )
    return [r["prompt"] for r in rows], [r["categories"] for r in rows], [r["unsafe"] for r in rows]


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def score_document(prompts, categories, unsafe, **context) -> dict:
    """The results JSON: ``rows`` as the issue specifies, plus protocol and provenance."""
    rows = metrics.score(prompts, categories, unsafe)
    return {
        "schema_version": SCHEMA_VERSION,
        **context,
        "protocol": {"draws": metrics.DRAWS, "sample": metrics.SAMPLE, "seed": metrics.SEED},
        "rows": [{k: _clean(v) for k, v in r.items()} for r in rows],
    }


def score_source(source: str) -> dict:
    """Score a run directory or a records file."""
    from .store import DB_NAME, RunStore

    path = Path(source)
    if not path.exists():
        raise InputError(f"{source!r} does not exist (expected a run directory or a CSV/Parquet of records)")
    if path.is_dir():
        if not (path / DB_NAME).is_file():
            raise InputError(f"{source!r} is not an I2P run directory (no {DB_NAME})")
        store = RunStore.open(path)
        try:
            data = records_from_store(store)
            context = {
                "source": str(path),
                "config": store.config,
                "versions": store.meta("versions"),
                "classifiers": {n: store.meta(f"classifier.{n}") for n in store.classifiers()},
            }
        finally:
            store.close()
    else:
        data = load_records_file(path)
        context = {"source": str(path)}
    return score_document(*data, **context)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'category':<18}{'images':>8}{'inappropriate':>15}{'exp. max':>18}"]
    for r in rows:
        p = r["inappropriate_probability"]
        m, s = r["expected_max_inappropriateness"], r["expected_max_inappropriateness_std"]
        ptxt = "-" if p is None else f"{p:.2f}"
        mtxt = "-" if m is None else f"{m:.2f} ± {s:.2f}"
        lines.append(f"{r['category']:<18}{r['images']:>8}{ptxt:>15}{mtxt:>18}")
    return "\n".join(lines)
