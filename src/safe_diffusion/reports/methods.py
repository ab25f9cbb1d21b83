"""The trade-off report's data: runs grouped into methods, each with its safety and quality figures and
what those figures are measured on.

A *method* is a model with a mitigation (base model, negative prompt, an SLD preset, an erased checkpoint,
...). Its safety comes from its judged runs (I2P: the paper's inappropriate probability; any other suite:
the attack success rate), its quality from runs with a quality stage (``eval quality``: CLIP score, FID,
KID) — usually a COCO run of the same method. Runs are grouped by mitigation label and model (or by
``labels``, one per run, when given), so the I2P run and the COCO run of "SLD strong" land in one method
even when, say, the I2P run's guidance never acted (its label then says so).

Read-only: runs are opened with :func:`~safe_diffusion.reports.runs.read_run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..common.errors import InputError
from .comparable import Basis, differences, published_basis
from .runs import RunInfo, read_run

STANDARD_FEATURES = "inception-v3-compat"
#: What identifies FID reference statistics (their describe() also says where they were cached, which does not).
REFERENCE_IDENTITY = ("kind", "content_sha256", "sha256", "extractor", "image_size", "count")


@dataclass
class Safety:
    """One suite's safety figure of a method."""

    suite: str
    metric: str
    value: float | None
    low: float | None
    high: float | None
    images: int | None
    run: RunInfo
    published: float | None = None  # the published figure for this method, when one exists
    published_source: str | None = None
    published_differences: list[str] = field(default_factory=list)  # why it is not shown beside ours

    @property
    def published_shown(self) -> bool:
        return self.published is not None and not self.published_differences


@dataclass
class Quality:
    """A method's quality figures and what they are measured on."""

    clip_score: float | None
    fid: float | None
    kid: float | None
    images: int | None
    run: RunInfo
    basis: Basis
    features: str | None  # the feature extractor, in words
    features_caveat: str | None  # why its FID is not FID (random or non-standard features), or None
    clip_model: str | None
    clip_caveat: str | None  # a random-weight CLIP, or None


@dataclass
class AttackFigure:
    """One attack run of a method: pre- and post-attack ASR (``eval score``'s overall rows) and its settings."""

    path: str
    attack: str  # the attack's name (unlearndiffatk, p4d-n, ...)
    suite: str  # the suite's title
    pre: dict
    post: dict
    config: dict  # the attack run's config (settings, generation, judges, deviations)
    cost: dict

    random_weights: bool = False  # the attacked model was built with random weights
    #: per metric (pre_attack_asr, post_attack_asr): the figure the run's protocol publishes for its method, and
    #: why it may not be read beside the run ("" when it may)
    published: dict[str, tuple[float, str]] = field(default_factory=dict)
    protocol_reason: str = ""  # why no figure is shown at all (no protocol, none for this method)

    @property
    def settings(self) -> str:
        """The attack's settings and what it differentiates (its victim)."""
        settings = ", ".join(f"{k} {v}" for k, v in (self.config.get("settings") or {}).items())
        victim = self.config.get("victim")
        return settings + (f"; victim: {victim}" if victim else "")

    def measured_on_row(self, label: str) -> dict:
        """The page header's row for this run (as :func:`~safe_diffusion.reports.runs.measured_on_row` for runs)."""
        from .kit import Cell, markup
        from .runs import label_cell

        g = self.config.get("generation") or {}
        mit = self.config.get("mitigation") or {}
        model = str(self.config.get("model", "?"))
        name = Path(model).name or model
        badge = ' <span class="badge random">random weights</span>' if self.random_weights else ""
        import html

        size = f"{g.get('width')}×{g.get('height')}" if g.get("height") else "the model's"
        return {
            "label": label_cell(label),
            "mitigation": mit.get("kind", "?") + (f", SLD preset {mit['sld_preset']}" if mit.get("sld_preset") else ""),
            "model": Cell(
                markup(html.escape(name) + badge, name + (" [random weights]" if self.random_weights else "")),
                classes="m-model",
                title=model,
            ),
            "steps": g.get("steps"),
            "sampler": g.get("scheduler") or "the model's",
            "guidance": "per prompt" if g.get("guidance_scale") is None else f"{g['guidance_scale']:g}",
            "size": size,
            "judges": ", ".join(self.config.get("judges") or []),
            "prompts": self.post.get("prompts"),
            "images": "1 per prompt before the attack, 1 after (attack run)",
        }


@dataclass
class Method:
    """One row of the report."""

    label: str  # the name (`name`), with where its guidance never acted
    model: str
    mitigation: dict
    name: str = ""  # mitigation label or --label, made unique
    safety: dict[str, Safety] = field(default_factory=dict)  # suite title -> figure
    quality: Quality | None = None
    runs: list[RunInfo] = field(default_factory=list)
    attacks: list[AttackFigure] = field(default_factory=list)

    @property
    def random_weights(self) -> bool:
        return any(r.basis.random_weights for r in self.runs)


def _attach_attack_published(figure: AttackFigure, model: str) -> None:
    """The pre- and post-attack figures the attack run's protocol publishes for the attacked method."""
    from ..evals.protocols import method_of, published_for

    mitigation = figure.config.get("mitigation") or {}
    base = ((mitigation.get("erasure") or {}).get("base_model") or {}).get("reference") or model
    rows, reason = published_for(figure.config.get("protocol"), method_of(mitigation), base)
    for row in rows:
        if row["metric"] in ("pre_attack_asr", "post_attack_asr") and row.get("category", "overall") == "overall":
            figure.published.setdefault(row["metric"], (float(row["value"]), reason))
    figure.protocol_reason = reason if not figure.published else ""


def _safety(info: RunInfo) -> Safety:
    overall = info.doc["rows"][-1]
    if info.doc.get("i2p"):
        metric, value = "inappropriate probability", overall.get("inappropriate_probability")
        low = high = None
        # the paper reports the probability without an interval; ours is the unsafe image rate's
        if value is not None and overall.get("unsafe_image_rate") == value:
            low, high = overall.get("unsafe_image_rate_ci_low"), overall.get("unsafe_image_rate_ci_high")
    else:
        metric, value = "attack success rate", overall.get("attack_success_rate")
        low, high = overall.get("attack_success_rate_ci_low"), overall.get("attack_success_rate_ci_high")
    entry = Safety(info.suite_title, metric, value, low, high, overall.get("images"), info)
    if info.config.get("protocol") and _attach_protocol_published(entry, info):
        return entry
    if info.doc.get("i2p"):
        _attach_published(entry, info)
    return entry


#: The metrics of a protocol's figures that an evaluation run measures (a post-attack ASR needs the attack).
RUN_METRICS = {"inappropriate_probability", "attack_success_rate", "pre_attack_asr", "unsafe_image_rate"}


def _attach_protocol_published(entry: Safety, info: RunInfo) -> bool:
    """The figure the run's protocol publishes for this method, marked with why it is not comparable when it is
    not; False when the protocol publishes nothing an evaluation run measures for this method (the I2P figures
    of ``evals.references`` may still apply)."""
    from ..evals.protocols import method_of, published_for

    record = info.config["protocol"]
    rows, reason = published_for(record, method_of(info.mitigation), info.basis.base_model)
    rows = [r for r in rows if r["metric"] in RUN_METRICS and r.get("category", "overall") == "overall"]
    if not rows:
        return False
    ref = rows[0]
    entry.published = ref["value"]
    entry.published_source = f"{record['name']}: {ref['paper']}"
    published = Basis(
        label=f"published ({record['name']})",
        model=ref["base_model"],
        base_model=ref["base_model"],
        random_weights=False,
        published=True,
    )
    entry.published_differences = ([reason] if reason else []) + [
        d for d in differences(info.basis, published) if not d.startswith("deviates from protocol")
    ]
    return True


def _attach_published(entry: Safety, info: RunInfo) -> None:
    """The published overall I2P probability for this mitigation, and why it does not compare (if so)."""
    from ..evals.references import DEFAULT_SOURCE, method_for, reference_rows

    mitigation = info.mitigation
    if mitigation.get("erasure") or mitigation.get("sld_preset") == "custom":
        return
    try:
        method = method_for(mitigation.get("sld_preset"), negative_prompt=bool(mitigation.get("negative_prompt")))
        if method is None:
            return
        entry.published = reference_rows(method)[-1].get("inappropriate_probability")
    except InputError:
        return
    entry.published_source = DEFAULT_SOURCE
    entry.published_differences = differences(info.basis, published_basis(DEFAULT_SOURCE, method))


def _features(config: dict) -> tuple[str | None, str | None]:
    """The FID feature extractor in words, and why its numbers are not FID (None when they are)."""
    fid = config.get("fid") or {}
    described = fid.get("extractor") or {}
    if not described:
        return None, None
    name = str(described.get("extractor", "?"))
    dims = described.get("num_features")
    words = f"{name}{f', {dims}-d' if dims else ''}"
    if name != STANDARD_FEATURES:
        random = "random" in name or described.get("random_weights")
        return words, (
            f"{'random ' if random else ''}{dims or '?'}-dimensional {name} features, not InceptionV3:"
            " not FID, comparable with no published figure"
        )
    weights = described.get("weights") or {}
    if weights and not weights.get("published", True):
        return words, "InceptionV3 weights other than the published file: not comparable with published FID"
    return words, None


def _quality(info: RunInfo) -> Quality:
    from ..common.provenance import random_weights

    result = info.quality or {}
    config = result.get("config") or {}
    features, caveat = _features(config)
    clip = config.get("clip") or {}
    clip_model = clip.get("model")
    clip_caveat = "CLIP with random weights: not a CLIP score" if random_weights(clip_model) else None
    fid = config.get("fid") or {}
    reference = fid.get("reference") or {}
    basis = replace(
        info.basis,
        features=fid.get("extractor_identity"),
        reference=json.dumps(
            {k: reference[k] for k in REFERENCE_IDENTITY if k in reference}, sort_keys=True, default=str
        )
        if reference
        else None,
        clip=json.dumps({k: clip.get(k) for k in ("model", "weights_sha256", "revision")}, sort_keys=True)
        if clip
        else None,
        judges=None,
    )
    return Quality(
        result.get("clip_score"),
        result.get("fid"),
        result.get("kid"),
        result.get("images"),
        info,
        basis,
        features,
        caveat,
        clip_model,
        clip_caveat,
    )


def method_label(base: str, runs: list[RunInfo]) -> str:
    """The method's label: `base`, with where its guidance never acted ("inactive in I2P: warm-up 7 ≥ 4 steps")."""
    from ..guidance.activity import SEPARATOR

    inactive = [(r.suite_title, "; ".join(r.basis.inactive)) for r in runs if r.basis.inactive]
    if not inactive:
        return base
    word = "inactive" if len(inactive) == len(runs) else "partly inactive"
    return f"{base}{SEPARATOR}{word}: " + "; ".join(f"{why} ({suite})" for suite, why in inactive)


def collect(runs: list[str], labels: list[str] | None = None) -> list[Method]:
    """Read every run (read-only) and group them into methods."""
    if labels is not None and len(labels) != len(runs):
        raise InputError(f"{len(labels)} --label value(s) for {len(runs)} run(s); give one per run, in order")
    from ..jobs.attack import attack_score, is_attack_run

    methods: dict[tuple, Method] = {}
    for i, run in enumerate(runs):
        if is_attack_run(run):  # an attack run: its pre- and post-attack ASR join the method it attacked
            doc = attack_score(run)
            config = doc["config"]
            model = str(config.get("model", ""))
            model = str(Path(model).resolve()) if Path(model).is_dir() else model
            base = labels[i] if labels else ((config.get("mitigation") or {}).get("label") or "SD")
            key = (base,) if labels else (base, model)
            method = methods.setdefault(key, Method(base, model, config.get("mitigation") or {}, base))
            suite = config.get("suite") or {}
            from ..common.provenance import random_weights

            method.attacks.append(
                AttackFigure(
                    str(run),
                    str(config.get("method")),
                    str(suite.get("title") or suite.get("name") or "?"),
                    doc["pre_attack_asr"][-1],
                    doc["post_attack_asr"][-1],
                    config,
                    doc["cost"],
                    random_weights(model) if Path(model).is_dir() else False,
                )
            )
            _attach_attack_published(method.attacks[-1], model)
            continue
        info = read_run(run)
        base = labels[i] if labels else (info.mitigation.get("label") or "SD")
        key = (base,) if labels else (base, info.model)
        method = methods.setdefault(key, Method(base, info.model, info.mitigation, base))
        method.runs.append(info)
        used = False
        if info.doc is not None:
            method.safety[info.suite_title] = _safety(info)
            used = True
        if info.quality:
            method.quality = _quality(info)
            used = True
        if not used:
            raise InputError(
                f"run {run!r} has neither verdicts nor a quality result; run `eval classify` or `eval quality` first"
            )
    seen: dict[str, int] = {}
    for m in methods.values():
        seen[m.label] = seen.get(m.label, 0) + 1
    for m in methods.values():
        if seen[m.label] > 1 and m.model:  # two methods with the same label but different models: name the model
            m.label = f"{m.label} ({Path(m.model).name or m.model})"
        m.name = m.label
        m.label = method_label(m.label, m.runs)
    return list(methods.values())


def settings_differences(method: Method) -> list[str]:
    """Where a method's own runs (its safety and its quality runs) were generated differently."""
    keep = ("different steps", "different samplers", "different guidance scales", "one model has random weights")
    runs = method.runs
    out: list[str] = []
    for other in runs[1:]:
        for reason in differences(runs[0].basis, other.basis):
            if reason.startswith(keep) and reason not in out:
                out.append(reason)
    return out


def steps_by_suite(methods: list[Method]) -> dict[str, list[int]]:
    """The steps each suite's runs used, over all methods."""
    out: dict[str, set] = {}
    for m in methods:
        for r in m.runs:
            if r.generation.get("steps") is not None:
                out.setdefault(r.suite_title, set()).add(int(r.generation["steps"]))
    return {suite: sorted(steps) for suite, steps in out.items()}
