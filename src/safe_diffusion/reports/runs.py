"""A run as the reports read it (read-only): its scores, records, quality result, label and basis.

:func:`read_run` opens an evaluation run once and gathers what the evaluation report and the trade-off
report show about it: the results document (when judged), the per-image records, the generation status,
the quality stage's result (when measured), the run's label — with "inactive" when its guidance never
acted (:func:`safe_diffusion.guidance.activity.run_label`) — and the :class:`~.comparable.Basis` its
figures are measured on, with the header row that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .comparable import Basis, judge_key, prompt_fingerprint
from .kit import Cell, markup


@dataclass
class RunInfo:
    path: str
    config: dict
    label: str  # the mitigation label, with "inactive: …" when its guidance never acted
    doc: dict | None  # the results document (evals.results); None when the run is not judged
    records: list[dict]
    status: dict
    quality: dict | None  # the quality stage's recorded result; None when not measured
    basis: Basis

    @property
    def model(self) -> str:
        return str((self.config.get("model") or {}).get("reference", ""))

    @property
    def mitigation(self) -> dict:
        return self.config.get("mitigation") or {}

    @property
    def generation(self) -> dict:
        return self.config.get("generation") or {}

    @property
    def suite(self) -> dict:
        return self.config.get("suite") or {}

    @property
    def suite_title(self) -> str:
        return str(self.suite.get("title") or self.suite.get("name") or "suite")


def _random_judges(judges: dict[str, dict]) -> tuple[str, ...]:
    from ..common.provenance import random_weights

    return tuple(sorted(n for n, info in judges.items() if random_weights(info.get("model"))))


def basis_of(config: dict, records: list[dict], judges: dict[str, dict], label: str | None = None) -> Basis:
    """The basis of a run's figures: from its frozen config, its records (which prompts have images) and
    its judges' describe()."""
    from ..common.provenance import random_weights
    from ..guidance.activity import inactive_parts

    model, gen, mit = config.get("model") or {}, config.get("generation") or {}, config.get("mitigation") or {}
    erasure = mit.get("erasure") or {}
    base = (erasure.get("base_model") or {}).get("reference") if erasure else None
    prompts = {(r["prompt_index"], r["prompt"]) for r in records}
    protocol = config.get("protocol") or {}
    from ..evals.protocols import describe_deviation

    return Basis(
        label=label,
        model=model.get("reference"),
        base_model=base or model.get("reference"),
        random_weights=random_weights(model.get("reference")),
        steps=gen.get("steps"),
        sampler=gen.get("scheduler_class") or model.get("scheduler"),
        guidance_scale=gen.get("guidance_scale"),
        suite=(config.get("suite") or {}).get("name"),
        prompt_set=prompt_fingerprint(prompts),
        prompts=len(prompts),
        images_per_prompt=gen.get("images_per_prompt"),
        images=len(records),
        judges=tuple(sorted((n, judge_key(info)) for n, info in judges.items())) if judges else None,
        random_judges=_random_judges(judges),
        protocol=protocol.get("name"),
        deviations=tuple(describe_deviation(d) for d in protocol.get("deviations") or ()),
        inactive=tuple(inactive_parts(mit.get("guidance") or [], gen.get("steps"), gen.get("guidance_scale"))),
    )


def read_run(path: str | Path, *, scores: bool = False) -> RunInfo:
    """Read a run (read-only); raises InputError for a folder that is not a run, and with `scores` for a run
    that has no images or no verdicts yet."""
    from ..evals.quality import run_quality
    from ..evals.results import score_store
    from ..evals.store import RunStore
    from ..guidance.activity import run_label

    store = RunStore.open(path)
    try:
        config = store.config
        judged = scores or (bool(store.rule_judges()) and bool(store.images()))
        doc = score_store(store) if judged else None
        records = store.records()
        status = store.status()
        quality = run_quality(store)
        judges = store.judges() if judged else {}
    finally:
        store.close()
    label = run_label(config) or "SD"
    return RunInfo(str(path), config, label, doc, records, status, quality, basis_of(config, records, judges, label))


def model_cell(info: RunInfo) -> Cell:
    """The model with its content identity, and a "random weights" badge where it has them."""
    import html

    model = info.config.get("model") or {}
    reference = str(model.get("reference", "?"))
    name = Path(reference).name if Path(reference).is_absolute() else reference
    identity = str(model.get("identity", ""))[:19]
    text = f"{html.escape(name)} <small>({html.escape(identity)})</small>"
    if info.basis.random_weights:
        text += (
            ' <span class="badge random" title="built with random weights: its numbers are noise">random weights</span>'
        )
    return Cell(
        markup(text, f"{name} ({identity})" + (" [random weights]" if info.basis.random_weights else "")),
        classes="m-model",
        title=reference,
    )


def label_cell(label: str) -> Cell:
    """A run's label; an "inactive" label gets a badge, so it cannot be missed."""
    import html

    from ..guidance.activity import SEPARATOR, is_inactive_label

    if not is_inactive_label(label):
        return Cell(label, classes="m-label")
    name, _, why = label.partition(SEPARATOR)
    return Cell(
        markup(f'{html.escape(name)} <span class="badge inactive">{html.escape(why)}</span>', label),
        classes="m-label inactive",
        title=why,
    )


def judges_text(judges: dict[str, dict], random_judges: tuple[str, ...] = ()) -> str:
    """The judges, each with what determines its verdicts (model, threshold …); "(random weights)" where so."""
    parts = []
    for name in sorted(judges):
        info = judges[name]
        bits = []
        for key in ("model", "model_file", "resolution", "threshold", "mode"):
            if key in info and not isinstance(info[key], (dict, list)):
                value = str(info[key])
                bits.append(Path(value).name if key == "model" and Path(value).is_absolute() else value)
        if name in random_judges:
            bits.append("random weights")
        parts.append(f"{name} ({', '.join(bits)})" if bits else name)
    return "; ".join(parts) or "none"


def size_text(gen: dict) -> str:
    """'512×512 (native)', or 'each prompt's own, else 512×512' for a suite that sizes its rows; with the
    initial noise named when it is not a CPU generator's ('; CUDA-generator noise')."""
    size = f"{gen.get('width')}×{gen.get('height')}"
    text = (
        f"each prompt's own, else {size}" if gen.get("size_source") == "suite" else f"{size} ({gen.get('size_source')})"
    )
    return text + ("; CUDA-generator noise" if gen.get("noise") == "cuda" else "")


def measured_on_row(
    info: RunInfo, *, label: str | None = None, judges: dict[str, dict] | None = None
) -> dict[str, Any]:
    """The header row of a run: label, mitigation, model, steps, sampler, guidance, size, judges, prompts, images."""
    gen = info.generation
    guidance = gen.get("guidance_scale")
    mit = info.mitigation
    mitigation = mit.get("kind", "?")
    if mit.get("sld_preset"):
        mitigation += f", SLD preset {mit['sld_preset']}"
    return {
        "label": label_cell(label or info.label),
        "mitigation": mitigation,
        "model": model_cell(info),
        "steps": gen.get("steps"),
        "sampler": info.basis.sampler,
        "guidance": "per prompt" if guidance is None else f"{guidance:g}",
        "size": f"{size_text(gen)}, {gen.get('dtype')}",
        "judges": judges_text(
            judges if judges is not None else (info.doc or {}).get("judges") or {}, info.basis.random_judges
        ),
        "prompts": info.basis.prompts,
        "images": f"{info.basis.images} ({gen.get('images_per_prompt')}/prompt; "
        f"{info.status.get('generated', '?')} of {info.status.get('total', '?')} generated)",
        "protocol": protocol_cell(info.config.get("protocol")),
    }


def protocol_cell(record: dict | None) -> str | None:
    """'safree-i2p v1' for a run that follows its protocol; with ', deviates: steps: 50 → 4' when it does not."""
    if not record:
        return None
    text = f"{record.get('name')} v{record.get('version')}"
    if record.get("deviations"):
        from ..evals.protocols import describe_deviation

        text += ", deviates: " + "; ".join(describe_deviation(d) for d in record["deviations"])
    return text
