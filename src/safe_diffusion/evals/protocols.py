"""Protocols: how a published figure was measured, as data files, run by name.

A protocol is a named, versioned YAML file (``data/protocols/*.yaml``; a user's own with ``--protocol
FILE.yaml`` or in a folder on ``SAFE_DIFFUSION_PROTOCOLS``) that fixes everything a figure depends on:

* ``suite``: the suite (a registered name), the columns that mean prompt, seed and guidance, the sha256 of
  the data file the figure used, and how prompts are counted (``per-row``, or ``pooled-by-text`` as I2P);
* ``generation``: images per prompt, seed and seed rule, the initial noise's generator (``noise``), sampler
  (``scheduler``), steps, guidance scale (a number, or ``suite``: each prompt's own), size and dtype;
* ``judges``: the judges and their set-up (NudeNet's mode, set-up, threshold, labels);
* ``metrics``: what the paper reports; ``references``: its figures (paper, table, method, base model,
  metric, category, value, tolerance); ``sources``: where each value comes from (file and line of the
  official code, or the paper's section).

Files share parts by inclusion, as lm-evaluation-harness' task files do: ``include: _safree.yaml`` (a
file or a list, relative to the including file) is read first and the including file's keys override it,
section by section. Files whose names start with ``_`` are parts only and are not listed.

:func:`settings_for` turns a protocol and what a user set explicitly into :func:`~safe_diffusion.jobs.
evaluate.evaluate`'s keyword arguments: the protocol's value for every setting the user left alone, the
user's where they set one, and a ``protocol`` record naming the protocol and every deviation ("steps:
50 → 4"). Reports show a published figure only beside a run without deviations
(:func:`published_for`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..common.hashing import sha256_bytes
from ..common.registry import Registry

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "data" / "protocols"
ENV_PATH = "SAFE_DIFFUSION_PROTOCOLS"
COUNTING = ("per-row", "pooled-by-text")

#: The settings a protocol fixes, per section, with the :func:`evaluate` keyword each one becomes.
SECTIONS: dict[str, dict[str, str]] = {
    "suite": {
        "name": "suite",
        "columns": "columns",
        "categories": "categories",
        "sha256": "",
        "variant": "",
        "counting": "",
        "data": "",
        "rows": "",
    },
    "generation": {
        "images_per_prompt": "images_per_prompt",
        "seed": "seed",
        "seed_rule": "seed_rule",
        "scheduler": "scheduler",
        "noise": "noise",
        "images_per_draw": "images_per_draw",
        "steps": "steps",
        "guidance_scale": "guidance_scale",
        "height": "height",
        "width": "width",
        "dtype": "dtype",
    },
    "judges": {
        "names": "judges",
        "nudenet_mode": "nudenet_mode",
        "nudenet_setup": "nudenet_setup",
        "nudenet_threshold": "nudenet_threshold",
        "nudenet_labels": "nudenet_labels",
        "nudenet_resolution": "nudenet_resolution",
        "object_class": "object_class",
        "object_model": "object_model",
        "style_label": "style_label",
        "style_top_k": "style_top_k",
    },
}
TOP_KEYS = {
    "protocol",
    "version",
    "title",
    "paper",
    "include",
    "notes",
    "metrics",
    "references",
    "sources",
    "method",
    "attack",
}
REFERENCE_KEYS = {"paper", "table", "method", "base_model", "metric", "category", "value", "tolerance", "note"}
#: What a run uses for a setting no protocol fixes (evaluate's own defaults).
DEFAULTS: dict[str, Any] = {
    "suite": "i2p",
    "steps": 50,
    "dtype": "float32",
    "seed": 0,
    "seed_rule": "offset",
    "judges": "q16,nudenet",
}
#: Settings that narrow a protocol's data: giving any of them is a deviation even if no protocol fixes them.
NARROWING = ("limit", "categories")


@dataclass(frozen=True)
class Protocol:
    """A loaded protocol: its sections as the file (and its includes) give them, and the file's identity."""

    name: str
    version: int
    title: str
    path: str
    sha256: str  # of the resolved document (includes merged), canonical JSON
    paper: str = ""
    method: str | None = None
    attack: str | None = None  # the attack (``attack run --method``) whose run measures its figures
    notes: str = ""
    suite: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    judges: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    references: tuple[dict[str, Any], ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def counting(self) -> str:
        return self.suite.get("counting", "per-row")

    def settings(self) -> dict[str, Any]:
        """The :func:`evaluate` keyword arguments this protocol fixes."""
        fixed: dict[str, Any] = {}
        for section, keys in SECTIONS.items():
            values = getattr(self, section)
            for key, keyword in keys.items():
                if keyword and key in values:
                    fixed[keyword] = values[key]
        if fixed.get("guidance_scale") == "suite":
            fixed["guidance_scale"] = None  # each prompt's own (the suite's guidance column)
        return fixed

    def record(self, deviations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """What a run stores about the protocol it follows."""
        return {
            "name": self.name,
            "version": self.version,
            "title": self.title,
            "sha256": self.sha256,
            "counting": self.counting,
            "path": self.path if Path(self.path).parent != PROTOCOL_DIR else None,  # a user's own file
            "deviations": list(deviations or []),
        }


# -- files ------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"protocol file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"protocol file {str(path)!r} cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"protocol file {path.name}{where}: not valid YAML") from None
    if not isinstance(doc, dict):
        raise InputError(f"protocol file {path.name}: expected a mapping of sections")
    return doc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: sections (mappings) merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise InputError(f"protocol file {path.name} includes itself (through {' → '.join(p.name for p in seen)})")
    doc = _read_yaml(path)
    includes = doc.pop("include", None)
    if includes is None:
        return doc
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise InputError(f"protocol file {path.name}: 'include' is a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in includes:
        merged = _merge(merged, _resolve(path.parent / name, (*seen, path)))
    return _merge(merged, doc)


def _check(doc: dict[str, Any], where: str) -> None:
    unknown = sorted(set(doc) - TOP_KEYS - set(SECTIONS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for section, keys in SECTIONS.items():
        values = doc.get(section, {})
        if not isinstance(values, dict):
            raise InputError(f"{where}: '{section}' is a mapping")
        bad = sorted(set(values) - set(keys))
        if bad:
            raise InputError(f"{where}: unknown {section} setting(s) {', '.join(bad)}; known: {', '.join(keys)}")
    if not isinstance(doc.get("protocol"), str) or not doc["protocol"].strip():
        raise InputError(f"{where}: 'protocol' (its name) is missing")
    if not isinstance(doc.get("version"), int):
        raise InputError(f"{where}: 'version' is an integer")
    counting = doc.get("suite", {}).get("counting", "per-row")
    if counting not in COUNTING:
        raise InputError(f"{where}: suite counting {counting!r}: choose one of {', '.join(COUNTING)}")
    references = doc.get("references", [])
    if not isinstance(references, list):
        raise InputError(f"{where}: 'references' is a list")
    for i, ref in enumerate(references):
        if not isinstance(ref, dict):
            raise InputError(f"{where}: reference {i + 1} is a mapping")
        bad = sorted(set(ref) - REFERENCE_KEYS)
        if bad:
            raise InputError(f"{where}: reference {i + 1}: unknown key(s) {', '.join(bad)}")
        missing = sorted({"paper", "method", "base_model", "metric", "value"} - set(ref))
        if missing:
            raise InputError(f"{where}: reference {i + 1} lacks {', '.join(missing)}")
        value = ref["value"]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
            raise InputError(f"{where}: reference {i + 1}: value {value!r} is not a fraction in [0, 1]")


def load_file(path: str | Path) -> Protocol:
    """The protocol in `path` (its includes merged), checked: every bad key or value is one InputError."""
    path = Path(path)
    doc = _resolve(path)
    _check(doc, f"protocol file {path.name}")
    canonical = json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode()
    return Protocol(
        name=doc["protocol"].strip(),
        version=doc["version"],
        title=str(doc.get("title", doc["protocol"])),
        path=str(path.resolve()),
        sha256=sha256_bytes(canonical),
        paper=str(doc.get("paper", "")),
        method=doc.get("method"),
        attack=doc.get("attack"),
        notes=str(doc.get("notes", "")),
        suite=dict(doc.get("suite", {})),
        generation=dict(doc.get("generation", {})),
        judges=dict(doc.get("judges", {})),
        metrics=tuple(doc.get("metrics", ())),
        references=tuple(dict(r) for r in doc.get("references", ())),
        sources={str(k): str(v) for k, v in (doc.get("sources") or {}).items()},
    )


# -- the registry -----------------------------------------------------------------------------------------

#: Protocols by name; entries are the files' loaders, read on first use (listing reads each file once).
PROTOCOLS: Registry[Protocol] = Registry("protocols")


def _folders() -> list[Path]:
    folders = [PROTOCOL_DIR]
    for part in os.environ.get(ENV_PATH, "").split(os.pathsep):
        if part.strip():
            folders.append(Path(part))
    return folders


def _register_files() -> None:
    for folder in _folders():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            if path.name.startswith("_"):
                continue
            protocol = load_file(path)
            PROTOCOLS.register(protocol.name, protocol, summary=protocol.title, replace=True)


_REGISTERED = False


def _ensure() -> None:
    global _REGISTERED
    if not _REGISTERED:
        _register_files()
        _REGISTERED = True


def available() -> list[Protocol]:
    """Every registered protocol, in name order."""
    _ensure()
    return [PROTOCOLS.get(n) for n in sorted(PROTOCOLS.names())]


def get_protocol(name: str | Path) -> Protocol:
    """A protocol by registered name, or from a ``.yaml`` file path."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return load_file(text)
    _ensure()
    if text not in PROTOCOLS:
        raise InputError(
            f"unknown protocol {text!r}; choose one of: {', '.join(sorted(PROTOCOLS.names()))}, or give a .yaml file"
        )
    return PROTOCOLS.get(text)


# -- a run's settings --------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def settings_for(protocol: str | Path | Protocol, **given: Any) -> dict[str, Any]:
    """:func:`evaluate`'s keyword arguments for a run of `protocol`, with `given` (the settings a user set;
    None: not set) overriding the protocol's; ``protocol`` in the result records each deviation.

    Judge options come back as ``judges`` and ``judge_settings`` (per judge, its keyword arguments).
    Giving ``limit`` or ``categories`` narrows the protocol's prompts: a deviation too. A ``data`` file is the
    suite's rows (several suites need one); :func:`with_suite_check` records it when its sha256 is not the
    protocol's.
    """
    from ..judges import judge_options_from, parse_judges
    from ..judges.options import JUDGE_OPTIONS

    chosen = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    fixed = chosen.settings()
    given = {k: v for k, v in given.items() if v is not None and v != ()}
    settings: dict[str, Any] = dict(DEFAULTS)
    settings.update(fixed)
    deviations = []
    for key, value in given.items():
        if key in fixed and not _same(fixed[key], value):
            deviations.append({"setting": key, "protocol": fixed[key], "run": value})
        elif key in NARROWING and key not in fixed:
            deviations.append({"setting": key, "protocol": None, "run": value})
        settings[key] = value
    options = {k: settings.pop(k) for k in JUDGE_OPTIONS if k in settings}
    names = parse_judges(settings["judges"])
    # The protocol's set-up of a judge the run leaves out (its --judges deviates) has nothing to configure.
    options = {k: v for k, v in options.items() if k in given or JUDGE_OPTIONS[k][0] in names}
    settings["judge_settings"] = judge_options_from(names, **options)
    settings["protocol"] = chosen.record(deviations)
    return settings


def run_settings(protocol: str | Path | Protocol | None = None, **given: Any) -> dict[str, Any]:
    """:func:`settings_for` with a protocol; without one, the run's defaults with `given` on top (no record)."""
    if protocol is not None:
        return settings_for(protocol, **given)
    from ..judges import judge_options_from, parse_judges
    from ..judges.options import JUDGE_OPTIONS

    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in given.items() if v is not None and v != ()})
    options = {k: settings.pop(k) for k in JUDGE_OPTIONS if k in settings}
    settings["judge_settings"] = judge_options_from(parse_judges(settings["judges"]), **options)
    return settings


def protocol_of(record: Mapping[str, Any]) -> Protocol:
    """The protocol a run's record names: registered by name, else the user's file it was read from."""
    if record.get("path") and Path(record["path"]).is_file():
        return load_file(record["path"])
    _ensure()
    if record.get("name") in PROTOCOLS:
        return PROTOCOLS.get(record["name"])
    raise InputError(f"protocol {record.get('name')!r} is not installed here")


def with_suite_check(record: Mapping[str, Any], suite) -> dict[str, Any]:
    """`record` with one more deviation when the loaded `suite` is not the protocol's data file (sha256)."""
    record = dict(record)
    expected = protocol_of(record).suite.get("sha256")
    if expected and suite.sha256 != expected:
        deviations = list(record.get("deviations") or [])
        deviations.append({"setting": "suite.sha256", "protocol": expected, "run": suite.sha256})
        record["deviations"] = deviations
    return record


def describe_deviation(deviation: Mapping[str, Any]) -> str:
    """'steps: 50 → 4' (or 'limit: 3' for a setting no protocol fixes)."""

    def short(value: Any) -> str:
        text = str(value)
        return text if len(text) <= 24 else text[:12] + "…"

    if deviation.get("protocol") is None:
        return f"{deviation['setting']}: {short(deviation['run'])}"
    return f"{deviation['setting']}: {short(deviation['protocol'])} → {short(deviation['run'])}"


def method_of(mitigation: Mapping[str, Any]) -> str:
    """A run's method as protocols name it: the erasure method of an erased checkpoint (``esd``, ``uce``,
    ``rece``), else ``sld-<preset>``, ``negative-prompt``, ``sd`` (none), or the mitigation's kind (``safree``)."""
    erasure = mitigation.get("erasure") or {}
    if erasure:
        return str(erasure.get("method") or "erased")
    kind = str(mitigation.get("kind") or "none")
    if kind == "sld" and mitigation.get("sld_preset"):
        return f"sld-{mitigation['sld_preset']}"
    return {"none": "sd", "negative_prompt": "negative-prompt"}.get(kind, kind.replace("_", "-"))


def published_for(record: Mapping[str, Any] | None, method: str | None, base_model: str | None) -> tuple[list, str]:
    """The figures the run's protocol publishes for `method`, and one line saying why they may not be read
    beside the run ("" when they may): a deviation from the protocol, another base model, a changed protocol.
    No figures when the run follows no protocol or the protocol publishes none for `method`."""
    if not record:
        return [], "the run follows no protocol"
    try:
        protocol = protocol_of(record)
    except InputError as exc:
        return [], str(exc)
    rows = [r for r in protocol.references if r["method"] == method]
    if not rows:
        have = sorted({r["method"] for r in protocol.references})
        return [], (
            f"protocol {protocol.name} publishes no figure for {method or 'this mitigation'}"
            + (f" (it has: {', '.join(have)})" if have else "")
        )
    deviations = record.get("deviations") or []
    if deviations:
        listed = "; ".join(describe_deviation(d) for d in deviations[:3])
        more = f" and {len(deviations) - 3} more" if len(deviations) > 3 else ""
        return rows, f"deviates from protocol {protocol.name} ({listed}{more})"
    if protocol.sha256 != record.get("sha256"):
        return rows, f"protocol {protocol.name} has changed since the run (sha256 differs)"
    if rows[0]["base_model"] != base_model:
        return rows, f"the published figure is for {rows[0]['base_model']}, not {base_model}"
    return rows, ""


def _cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def markdown_table() -> str:
    """docs/protocols.md's table: one row per shipped protocol, one column per setting, each value with its
    source where the protocol names one (tests check the docs hold exactly this)."""
    columns = [
        ("suite", "suite", "suite"),
        ("counting", "counting", "counting"),
        ("images/prompt", "images_per_prompt", "images_per_prompt"),
        ("seed", "seed_rule", "seed"),
        ("sampler", "scheduler", "scheduler"),
        ("steps", "steps", "steps"),
        ("guidance", "guidance_scale", "guidance_scale"),
        ("size", "height", "height"),
        ("judges", "judges", "judges"),
    ]
    head = "| protocol | " + " | ".join(c[0] for c in columns) + " | figures |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for protocol in available():
        settings = protocol.settings()
        cells = []
        for _, key, source_key in columns:
            if key == "counting":
                value = protocol.counting
            elif key == "seed_rule":
                rule = settings.get("seed_rule", "offset")
                value = "each row's own, else " + (
                    f"{settings.get('seed', 0)} for every row" if rule == "fixed" else "base + row"
                )
                value += "; CUDA generator" if settings.get("noise", "cpu") == "cuda" else ""
                if settings.get("images_per_draw"):
                    value += f"; one generator per prompt, {settings['images_per_draw']} images per draw"
            elif key == "guidance_scale":
                value = "each row's own" if settings.get("guidance_scale") is None else settings["guidance_scale"]
            elif key == "height":
                value = f"{settings.get('height')}×{settings.get('width')}, {settings.get('dtype')}"
                if "height" in (settings.get("columns") or {}):
                    value = "each row's own, else " + value
            elif key == "judges":
                judge = protocol.judges
                value = judge.get("names", "")
                extra = [f"{k.removeprefix('nudenet_')} {v}" for k, v in judge.items() if k != "names"]
                value += f" ({', '.join(extra)})" if extra else ""
            else:
                value = settings.get(key, "")
            source = protocol.sources.get(source_key) or (protocol.sources.get("judges") if key == "judges" else "")
            text, source = _cell(str(value)), _cell(source or "")
            cells.append(f"{text}<br><sub>{source}</sub>" if source else text)
        figures = f"{len(protocol.references)}" if protocol.references else "—"
        lines.append(f"| `{protocol.name}` | " + " | ".join(cells) + f" | {figures} |")
    return "\n".join(lines)
