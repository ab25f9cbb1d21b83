"""Attack runs on a page: the "Under attack" section (pre- and post-attack ASR per method and attack, with the
protocol's published figure where it may be read beside them), their rows of the "measured on" header and the
footer line. Shared by the evaluation report and the trade-off report; the figures come from
:func:`safe_diffusion.reports.methods.collect`."""

from __future__ import annotations

from pathlib import Path

from .kit import Cell, Figure, Gallery, Note, Paragraph, Section, Table
from .methods import Method
from .runs import label_cell


def rate_text(value, low, high) -> str:
    """``0.123 [0.100, 0.150]``: a rate with its interval (— when there is none)."""
    if value is None:
        return "—"
    text = f"{value:.3f}"
    if low is not None and high is not None:
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def attack_section(methods: list[Method], *, samples: int = 0, show_unsafe: bool = False) -> Section | None:
    """Pre- and post-attack ASR of every attack run, per method; a note where runs of one attack on one suite
    were measured differently; with `samples`, that many prompts' images before and after the attack per run
    (flagged ones blurred unless `show_unsafe`)."""
    entries = [(m, a) for m in methods for a in m.attacks]
    if not entries:
        return None
    head = [
        "method",
        "model",
        "attack",
        "suite",
        "pre-attack ASR [95% CI]",
        "post-attack ASR [95% CI]",
        "attack settings",
    ]
    with_protocol = any(a.config.get("protocol") for _, a in entries)
    if with_protocol:
        head += ["published (pre / post)"]
    rows = []
    for m, a in entries:
        published: list = []
        if with_protocol:
            shown = [
                f"{a.published[k][0]:.2f}" if k in a.published and not a.published[k][1] else "—"
                for k in ("pre_attack_asr", "post_attack_asr")
            ]
            hidden = sorted({why for _, why in a.published.values() if why} | ({a.protocol_reason} - {""}))
            text = " / ".join(shown)
            published = [Cell(text, classes="not-comparable", title="; ".join(hidden)) if hidden else text]
        rows.append(
            [
                label_cell(m.label),
                Path(m.model).name or m.model,
                a.attack,
                a.suite,
                rate_text(a.pre.get("attack_success_rate"), a.pre.get("attack_success_rate_ci_low"),
                      a.pre.get("attack_success_rate_ci_high")),
                rate_text(a.post.get("attack_success_rate"), a.post.get("attack_success_rate_ci_low"),
                      a.post.get("attack_success_rate_ci_high")),
                a.settings,
                *published,
            ]
        )  # fmt: skip
    blocks: list = [
        Table([head], rows, id="attack-table"),
        Paragraph(
            "ASR: the share of prompts whose image a judge flags, before the attack and after it, on the attacked"
            " target itself (`attack run`). After the attack, a prompt already unsafe before counts as a success"
            " (UnlearnDiffAtk's definition), so the post-attack ASR is never below the pre-attack one. A published"
            " figure is shown beside a run only when the run followed the protocol that publishes it (`attack run"
            " --protocol`) without deviating, for the same method and base model; † marks one that is not, with why."
        ),
    ]
    for m, a in entries:
        reasons = sorted({why for _, why in a.published.values() if why} | ({a.protocol_reason} - {""}))
        if a.config.get("protocol") and reasons:
            blocks.append(
                Note(
                    f"{m.name} · {a.attack}: the published figure is not shown: {'; '.join(reasons)}.", "not-comparable"
                )
            )
    random = sorted({m.name for m, a in entries if a.random_weights})
    if random:
        blocks.append(
            Note(f"{', '.join(random)}: attacked on random-weight checkpoints; these rates measure noise.", "warning")
        )
    groups: dict[tuple, list] = {}
    for m, a in entries:
        groups.setdefault((a.attack, a.suite), []).append((m, a))
    for (attack, suite), members in groups.items():
        keys = ("settings", "generation", "judges", "victim")
        first = members[0][1].config
        differ = sorted({k for _, a in members[1:] for k in keys if a.config.get(k) != first.get(k)})
        if differ:
            who = ", ".join(m.name for m, _ in members)
            notes = f"{attack} on {suite}: {who} were attacked with other {', '.join(differ)}; compare with care."
            blocks.append(Note(notes, "not-comparable"))
    section = Section("Under attack", blocks)
    if samples:
        section.sections.append(_attack_samples(entries, samples, show_unsafe))
    return section


def _attack_samples(entries: list, samples: int, show_unsafe: bool) -> Section:
    """Per attack run, `samples` prompts spread evenly over it: the image before the attack and after it."""
    from ..common.errors import InputError
    from ..jobs.attack import attack_records
    from .eval import sample_indices
    from .images import blur_note, thumbnail

    blur = blur_note(show_unsafe)
    section = Section(
        "Samples under attack",
        [Paragraph(f"Each prompt's image before the attack and with its adversarial prompt, on the target. {blur}")],
        level=3,
    )
    for m, a in entries:
        try:
            _, records = attack_records(a.path)
        except InputError:
            continue
        figures = []
        for r in (records[j] for j in sample_indices(len(records), samples)):
            i, images = r["prompt_index"], Path(a.path) / "images"
            pre, after = bool(r["pre_unsafe"]), r.get("adversarial_unsafe")
            figures.append(
                Figure(
                    thumbnail(images / f"{i:05d}-pre.png", pre and not show_unsafe), f"#{i} before{' flagged' * pre}"
                )
            )
            caption = f"#{i} attacked{' flagged' * bool(after)}" if not pre else f"#{i} not attacked (unsafe before)"
            figures.append(
                Figure(thumbnail(images / f"{i:05d}-post.png", bool(r["post_unsafe"]) and not show_unsafe), caption)
            )
        section.blocks.append(Gallery(figures, title=f"{m.label} · {a.attack} · {a.suite}"))
    return section


def attack_measured_on_rows(methods: list[Method]) -> list[dict]:
    """The "measured on" header rows of the methods' attack runs."""
    return [a.measured_on_row(f"{m.name} · {a.attack} · {a.suite}") for m in methods for a in m.attacks]


def attack_footer(methods: list[Method]) -> Paragraph:
    return Paragraph("Attack runs: " + "; ".join(f"{m.label}: {a.path}" for m in methods for a in m.attacks))
