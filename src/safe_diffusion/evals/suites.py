"""Prompt suites as data: a registry of specs, and one loader for files, the bundled I2P copy and the hub.

A suite is a table with a prompt per row and optional per-prompt ``categories`` (comma-separated
labels), ``seed``, ``guidance`` (classifier-free guidance scale), ``negative_prompt`` and image size
(``height`` and ``width``: only when mapped, e.g. ``--columns height=sd_image_height,width=sd_image_width``,
as RECE sizes I2P's images). A
:class:`SuiteSpec` says where a named suite comes from and which of its columns mean what (a list of
candidate names per field, the first present wins; ``--columns field=column`` overrides). Any CSV
or Parquet file with a ``prompt`` column is a suite too.

Prompts are kept exactly as the file has them (I2P's ``Null``, its four zero-width joiners U+200D
and its four prompts with line breaks included): they are what the model is given, and duplicates
are pooled by exact text when scoring. Every loaded suite is recorded by name, source, revision,
content hash and row count (:meth:`Suite.record`).

The named suites are data (``data/suites/suites.yaml``); reading a table's bytes and checking its cells
is :mod:`.tables`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..common.errors import InputError
from ..common.hashing import sha256_bytes, sha256_file
from ..common.hub import hub_errors
from ..common.registry import Registry
from .coco import load_coco_captions
from .tables import parse_categories, parse_guidance, parse_seed, parse_side, read_table

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUNDLED_CSV = DATA_DIR / "i2p_benchmark.csv"
BUNDLED_CSV_SHA256 = "c5ab09e3f37a0f6f01899f8771495385ab68934fb844f6398a6dd12183a6dfbc"

I2P_CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity")
CATEGORIES = I2P_CATEGORIES  # the I2P paper's order (kept under its old name)
FIELDS = ("prompt", "categories", "seed", "guidance", "negative_prompt", "height", "width")
FILE_SUFFIXES = (".csv", ".parquet", ".tsv", ".jsonl")


@dataclass(frozen=True)
class Prompt:
    index: int  # 0-based row in the suite
    text: str
    categories: tuple[str, ...]
    seed: int  # image k uses runner.image_seed(seed, k); image 0 uses `seed` itself
    guidance: float | None = None  # the suite's per-prompt guidance scale, if it has one
    negative_prompt: str | None = None
    height: int | None = None  # the suite's per-prompt image size, if it maps one (both or neither)
    width: int | None = None

    @property
    def sd_seed(self) -> int:  # I2P's name for it
        return self.seed


@dataclass(frozen=True)
class SuiteSpec:
    """Where a named suite comes from and what its columns mean."""

    name: str
    title: str
    columns: dict[str, tuple[str, ...]]
    hub: str | None = None  # dataset repo id
    hub_file: str | None = None  # one file of the repo (exact bytes), else datasets.load_dataset
    split: str = "train"
    bundled: Path | None = None
    bundled_sha256: str | None = None
    default_categories: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] | None = None  # allowed category labels (None: any)
    images_per_prompt: int = 1
    gated: bool = False
    licence: str = "unknown: check the source"
    homepage: str = ""
    how_to_get: str = ""
    paper: str = ""
    #: A suite whose file is not a prompt table (COCO's annotations): ``loader(path, base_seed)`` →
    #: (prompts, details recorded as the suite's columns); such a suite always needs ``--data FILE``.
    loader: Callable[[str, int], tuple[list[Prompt], dict[str, str]]] | None = None


_COMMON = {
    "prompt": ("prompt",),
    "categories": ("categories",),
    "seed": ("seed", "sd_seed", "evaluation_seed"),
    "guidance": ("guidance", "evaluation_guidance"),
    "negative_prompt": ("negative_prompt",),
}

#: Suites by name (a :class:`SuiteSpec`); other packages add theirs through the entry points
#: ``safe_diffusion.suites`` (:mod:`safe_diffusion.common.registry`).
SUITES: Registry[SuiteSpec] = Registry("suites")


def register_suite(spec: SuiteSpec) -> None:
    """Make suite `spec.name` usable as ``--suite NAME`` (registering a name again replaces it)."""
    SUITES.register(spec.name, spec, summary=spec.title, replace=True)


SUITE_DIR = DATA_DIR / "suites"


def _coco_loader(subset: str | None) -> Callable[[str, int], tuple[list[Prompt], dict[str, str]]]:
    def load(path: str, base_seed: int) -> tuple[list[Prompt], dict[str, str]]:
        captions = load_coco_captions(path, subset)
        prompts = [
            Prompt(c.index, c.text, ("coco",), c.seed if c.seed is not None else base_seed + c.index)
            for c in captions.captions
        ]
        source = captions.source
        details = {"format": str(source.get("format")), "subset": str(source.get("subset"))}
        details["sample_seed"] = str(source.get("seed"))
        if source.get("seed_column"):  # a caption table with its own per-row seeds (SAFREE's coco_30k_10k.csv)
            details["seed"] = str(source["seed_column"])
        return prompts, details

    return load


#: What a suite file's ``vocabulary`` and ``loader`` names mean.
VOCABULARIES = {"i2p": I2P_CATEGORIES}
LOADERS = {"coco": _coco_loader}


def spec_from_entry(name: str, entry: dict, folder: Path = SUITE_DIR) -> SuiteSpec:
    """The :class:`SuiteSpec` a suites file's entry describes (keys: the file's header)."""
    columns = {**_COMMON, **{k: tuple(v) for k, v in (entry.get("columns") or {}).items()}}
    columns = {k: v for k, v in columns.items() if v}  # an empty list drops the field
    vocabulary = entry.get("vocabulary")
    loader = entry.get("loader")
    return SuiteSpec(
        name=name,
        title=str(entry["title"]),
        columns={} if loader else columns,
        hub=entry.get("hub"),
        hub_file=entry.get("hub_file"),
        bundled=(folder / entry["file"]).resolve() if entry.get("file") else None,
        bundled_sha256=entry.get("sha256"),
        default_categories=tuple(entry.get("default_categories", ())),
        vocabulary=VOCABULARIES[vocabulary]
        if isinstance(vocabulary, str)
        else (tuple(vocabulary) if vocabulary else None),
        images_per_prompt=int(entry.get("images_per_prompt", 1)),
        gated=bool(entry.get("gated", False)),
        licence=entry.get("licence", "unknown: check the source"),
        homepage=entry.get("homepage", ""),
        how_to_get=entry.get("how_to_get", ""),
        paper=entry.get("paper", ""),
        loader=LOADERS[loader](None if entry.get("subset") is None else str(entry["subset"])) if loader else None,
    )


def _register_suites_file() -> None:
    """Every suite of ``data/suites/suites.yaml``, in its order."""
    import yaml

    entries = yaml.safe_load((SUITE_DIR / "suites.yaml").read_text(encoding="utf-8")) or {}
    for name, entry in entries.items():
        register_suite(spec_from_entry(name, entry))


_register_suites_file()


def available_suites() -> list[str]:
    return SUITES.names()


def get_suite_spec(name: str) -> SuiteSpec:
    if name not in SUITES:
        raise InputError(
            f"unknown suite {name!r}; choose from: {', '.join(SUITES.names())},"
            " or give a CSV/Parquet file with a prompt column"
        )
    return SUITES.get(name)


def find_suite_spec(name: str) -> SuiteSpec | None:
    """The spec registered as `name`, or None (a suite loaded from a file has none)."""
    return SUITES.get(name) if name in SUITES else None


@dataclass(frozen=True)
class Suite:
    """A loaded, validated suite."""

    name: str
    title: str
    prompts: list[Prompt]
    source: str  # "bundled", "hub:owner/name" or a resolved path
    sha256: str  # of the file's bytes, or of the rows' canonical JSON for a hub dataset
    revision: str | None = None  # the hub commit, when from the hub
    columns: dict[str, str] = field(default_factory=dict)  # field -> column used
    images_per_prompt: int = 1
    licence: str = ""

    @property
    def has_seeds(self) -> bool:
        return "seed" in self.columns

    @property
    def categories(self) -> tuple[str, ...]:
        """Every category label of the suite, the known vocabulary's order first."""
        seen = dict.fromkeys(c for p in self.prompts for c in p.categories)
        spec = find_suite_spec(self.name)
        order = list(spec.vocabulary) if spec and spec.vocabulary else []
        return tuple([c for c in order if c in seen] + [c for c in seen if c not in order])

    def record(self) -> dict:
        """What a run records about its suite."""
        return {
            "name": self.name,
            "title": self.title,
            "source": self.source,
            "revision": self.revision,
            "sha256": self.sha256,
            "rows": len(self.prompts),
            "columns": dict(self.columns),
            "licence": self.licence,
        }


# -- parsing --------------------------------------------------------------------------------------


def parse_columns(values: list[str] | None) -> dict[str, str]:
    """``["prompt=adv_prompt", "seed=evaluation_seed"]`` (or comma-separated) → {field: column}."""
    mapping = {}
    for item in ",".join(values or []).split(","):
        if not item.strip():
            continue
        fld, sep, col = item.partition("=")
        fld = fld.strip().lower()
        if not sep or not col.strip():
            raise InputError(f"--columns {item!r} must be FIELD=COLUMN, e.g. prompt=adv_prompt")
        if fld not in FIELDS:
            raise InputError(f"--columns: unknown field {fld!r}; fields: {', '.join(FIELDS)}")
        mapping[fld] = col.strip()
    return mapping


def parse_rows(
    header: list[str],
    rows: list[dict],
    name: str,
    spec: SuiteSpec,
    overrides: dict[str, str] | None = None,
    base_seed: int = 0,
) -> tuple[list[Prompt], dict[str, str]]:
    """Validate rows into prompts; returns them and the column used for each field."""
    used: dict[str, str] = {}
    for fld in FIELDS:
        if overrides and fld in overrides:
            if overrides[fld] not in header:
                raise InputError(
                    f"{name}: no column {overrides[fld]!r} (--columns {fld}=...); columns: {', '.join(header)}"
                )
            used[fld] = overrides[fld]
            continue
        for candidate in spec.columns.get(fld, ()):
            if candidate in header:
                used[fld] = candidate
                break
    if "prompt" not in used:
        wanted = "/".join(spec.columns.get("prompt", ("prompt",)))
        raise InputError(f"{name}: missing column {wanted} (or map one with --columns prompt=COLUMN)")
    if spec.vocabulary is not None and "categories" not in used:
        raise InputError(f"{name}: missing column(s) categories")
    if spec.name == "i2p" and "seed" not in used:
        raise InputError(f"{name}: missing column(s) sd_seed (needs prompt, categories, sd_seed)")
    if ("height" in used) != ("width" in used):
        raise InputError(
            f"{name}: map both an image height and width column (--columns height=...,width=...), or neither"
        )
    prompts = []
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        text = row.get(used["prompt"])
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise InputError(f"{where}: no prompt")
        text = str(text)
        if not text.strip():
            raise InputError(f"{where}: empty prompt")
        if "categories" in used:
            cats = parse_categories(row.get(used["categories"]), where, spec.vocabulary)
        else:
            cats = spec.default_categories or ("all",)
        seed = parse_seed(row.get(used["seed"]), where, used["seed"]) if "seed" in used else (base_seed + i) % (2**63)
        guidance = parse_guidance(row.get(used["guidance"]), where, used["guidance"]) if "guidance" in used else None
        negative = None
        if "negative_prompt" in used:
            value = row.get(used["negative_prompt"])
            negative = None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        size = [parse_side(row.get(used[f]), where, used[f]) if f in used else None for f in ("height", "width")]
        prompts.append(Prompt(i, text, cats, seed, guidance, negative, *size))
    if not prompts:
        raise InputError(f"{name} has a header but no prompts")
    return prompts, used


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise InputError(f"suite file {str(path)!r} must be .csv, .tsv, .jsonl or .parquet")
    return suffix[1:]


def _load_hub(spec: SuiteSpec, repo: str, revision: str | None) -> tuple[list[str], list[dict], str, str, str | None]:
    """(header, rows, source, sha256, revision) of a hub dataset; one line when it cannot be had."""
    if spec.bundled is not None:
        how = "; omit --data to use the bundled copy"
    elif spec.how_to_get or spec.homepage:
        how = f"; or download it ({spec.how_to_get or spec.homepage}) and pass --data FILE"
    else:
        how = ""
    try:
        if spec.hub_file:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id=repo, filename=spec.hub_file, repo_type="dataset", revision=revision))
            data = path.read_bytes()
            commit = path.parent.name if path.parent.parent.name == "snapshots" else revision
            header, rows = read_table(data, f"hub dataset {repo}", _format_of(path))
            return header, rows, f"hub:{repo}", sha256_bytes(data), commit
        try:
            import datasets
        except ImportError:
            raise InputError(
                f"loading {repo!r} from the hub needs datasets: pip install 'safe-diffusion[eval]'{how}"
            ) from None
        from huggingface_hub import HfApi, constants

        if revision is None and not constants.HF_HUB_OFFLINE:
            with contextlib.suppress(*hub_errors()):  # load_dataset reports the reason below
                revision = HfApi().dataset_info(repo).sha
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        ds = datasets.load_dataset(repo, split=spec.split, revision=revision)
        rows = ds.to_list()
        header = list(ds.column_names)
    except InputError:
        raise
    except hub_errors() as exc:  # offline, gated, unknown: all mean "not available here"
        text = " ".join(str(exc).split())
        kind = type(exc).__name__
        if "Gated" in kind or "gated" in text.lower() or "401" in text or "403" in text:
            raise InputError(
                f"hub dataset {repo!r} is gated: accept its conditions on huggingface.co/datasets/{repo} and log in"
                f" (huggingface-cli login or HF_TOKEN){how}"
            ) from None
        first = text.split(". ")[0][:160] or kind
        raise InputError(f"cannot load hub dataset {repo!r} ({first}){how}") from None
    canonical = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode()
    return header, rows, f"hub:{repo}", sha256_bytes(canonical), revision


def load_suite(
    suite: str | None = "i2p",
    *,
    data: str | None = None,
    columns: dict[str, str] | None = None,
    revision: str | None = None,
    base_seed: int = 0,
) -> Suite:
    """Load suite `suite` (a registered name or a file path).

    `data`: where a named suite's rows come from: a local file, ``hub`` (the spec's dataset) or
    ``hub:owner/name``; default: the bundled copy, else the hub, else an error saying how to get it.
    `columns` overrides the field → column mapping. `base_seed`: prompt i's seed is base_seed + i
    when the suite has no seed column.
    """
    suite = suite or "i2p"
    path = Path(suite)
    if suite not in SUITES and (path.suffix.lower() in FILE_SUFFIXES or path.exists()):
        if data is not None:
            raise InputError("--data is for named suites; --suite already names a file")
        spec = SuiteSpec(name=path.stem, title=path.name, columns=dict(_COMMON))
        source_spec = str(path)
    else:
        spec = get_suite_spec(suite)
        source_spec = data
    if spec.loader is not None:
        if source_spec is None or source_spec == "hub" or source_spec.startswith("hub:"):
            raise InputError(f"suite {spec.name!r} needs --data FILE: {spec.how_to_get}")
        file = Path(source_spec)
        prompts, details = spec.loader(source_spec, base_seed)
        return Suite(
            name=spec.name,
            title=spec.title,
            prompts=prompts,
            source=str(file.resolve()),
            sha256=sha256_file(file),
            columns=details,
            images_per_prompt=spec.images_per_prompt,
            licence=spec.licence,
        )
    if source_spec is None:
        if spec.bundled is not None:
            source_spec = "bundled"
        elif spec.hub is not None:
            source_spec = "hub"
        else:
            raise InputError(f"suite {spec.name!r} is not bundled: {spec.how_to_get}, then pass --data FILE")
    if source_spec == "bundled":
        if spec.bundled is None:
            raise InputError(f"suite {spec.name!r} has no bundled copy; pass --data FILE or --data hub")
        raw = spec.bundled.read_bytes()
        digest = sha256_bytes(raw)
        if spec.bundled_sha256 and digest != spec.bundled_sha256:
            raise InputError(
                f"the bundled {spec.bundled.name} is damaged (sha256 {digest[:12]}…); reinstall safe-diffusion"
            )
        header, rows = read_table(raw, f"bundled {spec.bundled.name}", _format_of(spec.bundled))
        source, revision = "bundled", None
    elif source_spec == "hub" or source_spec.startswith("hub:"):
        repo = source_spec.partition(":")[2] or spec.hub
        if not repo:
            raise InputError(f"suite {spec.name!r} has no hub dataset; pass --data FILE ({spec.how_to_get})")
        header, rows, source, digest, revision = _load_hub(spec, repo, revision)
    else:
        file = Path(source_spec)
        if not file.exists():
            raise InputError(f"suite file {source_spec!r} does not exist")
        if not file.is_file():
            raise InputError(f"suite file {source_spec!r} is not a file")
        raw = file.read_bytes()
        header, rows = read_table(raw, source_spec, _format_of(file))
        source, digest, revision = str(file.resolve()), sha256_bytes(raw), None
    name = source if source != "bundled" else f"bundled {spec.bundled.name}"
    prompts, used = parse_rows(
        header, rows, source_spec if source_spec not in ("bundled",) else name, spec, columns, base_seed
    )
    return Suite(
        name=spec.name,
        title=spec.title,
        prompts=prompts,
        source=source,
        sha256=digest,
        revision=revision,
        columns=used,
        images_per_prompt=spec.images_per_prompt,
        licence=spec.licence,
    )


def parse_category_filter(values: list[str] | None, suite: Suite | None = None) -> tuple[str, ...] | None:
    """--categories values (repeatable, or comma-separated) -> a validated tuple, or None for all."""
    if not values:
        return None
    known = suite.categories if suite is not None else I2P_CATEGORIES
    spec = find_suite_spec(suite.name) if suite is not None else None
    vocabulary = (spec.vocabulary if spec and spec.vocabulary else None) or known
    return parse_categories(",".join(values), "--categories", tuple(vocabulary))


def select(prompts: list[Prompt], categories: tuple[str, ...] | None, limit: int | None) -> list[Prompt]:
    """Prompts with any of `categories` (all when None), the first `limit` of them."""
    chosen = [p for p in prompts if categories is None or set(p.categories) & set(categories)]
    return chosen[:limit] if limit is not None else chosen


# -- compatibility with the I2P-only API ------------------------------------------------------------


def load_prompts(spec: str | Path | None = None) -> Suite:
    """The I2P suite: bundled (None / 'bundled'), the hub ('hub' / 'hub:owner/name') or a CSV path."""
    if spec is None or str(spec) == "bundled":
        return load_suite("i2p")
    return load_suite("i2p", data=str(spec))


def parse_prompt_csv(data: bytes, name: str) -> Suite:
    """An I2P-format CSV's bytes (prompt, categories, sd_seed) → a validated suite."""
    spec = get_suite_spec("i2p")
    header, rows = read_table(data, name, "csv")
    prompts, used = parse_rows(header, rows, name, spec)
    return Suite("i2p", "I2P", prompts, name, sha256_bytes(data), columns=used, images_per_prompt=10)
