"""Tables of prompts as bytes → rows, and the checks on their cells: every failure is one :class:`InputError`
naming the file, the row and the column.

CSV, TSV, JSONL and Parquet are read the same way (:func:`read_table`); a seed is a whole number in
``0..MAX_SEED`` (a float that is one, as pandas writes them, included), a guidance scale a finite number
≥ 0, categories a comma-separated list checked against a suite's vocabulary when it has one.
"""

from __future__ import annotations

import csv
import io
import json
import math

from ..common.errors import InputError
from ..common.validation import MAX_IMAGE_SIDE, MAX_SEED


def decode_text_file(data: bytes, name: str) -> str:
    if not data.strip():
        raise InputError(f"{name} is empty")
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} is a binary file, not a CSV")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text") from None


def read_table(data: bytes, name: str, fmt: str) -> tuple[list[str], list[dict]]:
    """(header, rows) of a CSV/TSV/JSONL/Parquet file's bytes; every failure is one InputError."""
    if fmt == "parquet":
        if not data:
            raise InputError(f"{name} is empty")
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError("Parquet needs pyarrow: pip install 'safe-diffusion[eval]'") from None
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(f"{name}: not a readable Parquet file ({type(exc).__name__})") from None
        return list(table.column_names), table.to_pylist()
    text = decode_text_file(data, name)
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    raise InputError(f"{name} line {i + 1}: not JSON") from None
                if not isinstance(row, dict):
                    raise InputError(f"{name} line {i + 1}: not a JSON object")
                rows.append(row)
        return (list(rows[0]) if rows else []), rows
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
        header = list(reader.fieldnames or [])
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:  # a dict row keeps only the last of them: the other column would be silently lost
            raise InputError(f"{name}: column(s) {', '.join(map(repr, twice))} appear more than once; rename one")
        rows = []
        for i, row in enumerate(reader):
            if None in row or any(v is None for v in row.values()):
                raise InputError(f"{name} row {i}: wrong number of fields")
            rows.append(row)
    except csv.Error as exc:
        raise InputError(f"{name}: not a readable CSV ({exc})") from None
    return header, rows


def parse_categories(value, where: str, vocabulary: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """'sexual, violence' -> ('sexual', 'violence'); unknown (given a vocabulary) or none is one line."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    labels = tuple(dict.fromkeys(c.strip().lower() for c in str(value).split(",") if c.strip()))
    if not labels:
        raise InputError(f"{where}: no categories")
    if vocabulary is not None:
        unknown = [c for c in labels if c not in vocabulary]
        if unknown:
            raise InputError(f"{where}: unknown category {unknown[0]!r}; known: {', '.join(vocabulary)}")
    return labels


def parse_seed(value, where: str, column: str = "seed") -> int:
    bad = InputError(f"{where}: {column} {value!r} is not a whole number")
    if isinstance(value, bool) or value is None:
        raise bad
    if isinstance(value, int):
        seed = value
    else:
        text = str(value).strip()
        if text.isdigit():
            seed = int(text)
        else:
            try:
                number = float(text)
            except ValueError:
                raise bad from None
            if not math.isfinite(number) or not number.is_integer():
                raise bad
            seed = int(number)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"{where}: {column} {seed} is outside 0..{MAX_SEED}")
    return seed


def parse_side(value, where: str, column: str = "height") -> int:
    """An image side in pixels: a whole number from 8 to MAX_IMAGE_SIDE, a multiple of 8."""
    side = parse_seed(value, where, column)
    if not 8 <= side <= MAX_IMAGE_SIDE or side % 8:
        raise InputError(f"{where}: {column} {side} is not a multiple of 8 from 8 to {MAX_IMAGE_SIDE}")
    return side


def parse_guidance(value, where: str, column: str = "guidance") -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {column} {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{where}: {column} must be a finite number >= 0, got {value!r}")
    return number
