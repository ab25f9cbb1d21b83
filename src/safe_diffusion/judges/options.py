"""Judge options as the command line gives them (``--nudenet-threshold 0.45``) → keyword arguments per judge
(``{"nudenet": {"threshold": 0.45}}``), checked before any model loads. One function for every command
that judges (``eval run``, ``eval classify``, ``audit``), so they take the same options the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.errors import InputError

#: Which judge each option configures, and the keyword it becomes.
JUDGE_OPTIONS = {
    "q16_model": ("q16", "model"),
    "nudenet_model": ("nudenet", "model"),
    "nudenet_resolution": ("nudenet", "resolution"),
    "nudenet_mode": ("nudenet", "mode"),
    "nudenet_setup": ("nudenet", "setup"),
    "nudenet_threshold": ("nudenet", "threshold"),
    "nudenet_labels": ("nudenet", "labels"),
    "object_model": ("object", "model"),
    "object_class": ("object", "target"),
    "style_model": ("style", "model"),
    "style_label": ("style", "label"),
    "style_top_k": ("style", "top_k"),
    "llavaguard_model": ("llavaguard", "model"),
    "llavaguard_policy": ("llavaguard", "policy"),
    "llavaguard_max_new_tokens": ("llavaguard", "max_new_tokens"),
}


def _check_nudenet(options: dict[str, Any]) -> dict[str, Any]:
    from ..common.validation import check_float
    from .nudenet import DEFAULT_SETUP, MODES, SETUPS, check_resolution, parse_labels

    mode = options.get("mode")
    if mode is not None:
        mode = options["mode"] = str(mode).strip().lower()
        if mode not in MODES:
            raise InputError(f"--nudenet-mode must be detector or classifier, got {mode!r}")
    setup = options.get("setup")
    if setup is not None:
        setup = options["setup"] = str(setup).strip().lower()
        if setup not in SETUPS:
            raise InputError(f"unknown --nudenet-setup {setup!r}; choose from: {', '.join(SETUPS)}")
        if mode is not None and SETUPS[setup].mode != mode:
            raise InputError(f"--nudenet-setup {setup} is a {SETUPS[setup].mode}, not a {mode}")
    if options.get("threshold") is not None:
        options["threshold"] = check_float("--nudenet-threshold", options["threshold"], above=0.0, maximum=1.0)
    if options.get("resolution") is not None:
        options["resolution"] = check_resolution(options["resolution"])
    if options.get("labels") is not None:
        if SETUPS[setup or DEFAULT_SETUP[mode or "detector"]].mode == "classifier":
            raise InputError("--nudenet-labels applies to the detector; the classifier has one unsafe score")
        options["labels"] = list(parse_labels(options["labels"]))
    return options


def judge_options_from(names: list[str], **given: Any) -> dict[str, dict[str, Any]]:
    """Keyword arguments per judge from command-line options (the keys of :data:`JUDGE_OPTIONS`; None: not given).

    An option for a judge that is not among `names` is refused (it would silently do nothing), and
    NudeNet's mode, set-up, threshold, labels and resolution are checked now, so a bad value fails in
    one line before any model loads.
    """
    unknown = sorted(set(given) - set(JUDGE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown judge option(s): {', '.join(unknown)}")
    options: dict[str, dict[str, Any]] = {}
    for option, value in given.items():
        if value is None:
            continue
        judge, keyword = JUDGE_OPTIONS[option]
        if judge not in names:
            flag = "--" + option.replace("_", "-")
            raise InputError(f"{flag} configures the {judge} judge, which is not among --judges ({','.join(names)})")
        options.setdefault(judge, {})[keyword] = str(value) if isinstance(value, Path) else value
    if "nudenet" in options:
        _check_nudenet(options["nudenet"])
    if "object" in names:  # checked now, before any model loads
        from .classifiers import object_class

        target = options.get("object", {}).get("target")
        if target is None:
            raise InputError("the object judge needs the object it looks for: --object-class (e.g. church)")
        object_class(target)
    # the style judge's model (the authors' artist classifier) has no hub id: the judge itself asks for it
    if "style" in names and options.get("style", {}).get("top_k") is not None:
        from ..common.validation import check_int

        options["style"]["top_k"] = check_int("--style-top-k", options["style"]["top_k"], minimum=1, maximum=1000)
    return options
