"""Concept erasure baselines: UCE and RECE (closed form) and ESD-x / ESD-u (fine-tuning).

``erase_concepts(model, out, ErasureConfig.build("uce", ["nudity"]))`` writes a diffusers folder that
every command loads as ``--model``, with ``erasure.json`` (read it with :func:`read_erasure_record`) and
the edited weights alone. :func:`apply_uce` / :func:`apply_rece` edit a loaded pipeline in memory; the
math is in :mod:`.uce`, :mod:`.rece` and :mod:`.esd` as pure functions.
"""

from importlib import import_module

_EXPORTS = {
    "METHODS": ".methods",
    "MethodSpec": ".methods",
    "UCEOptions": ".methods",
    "RECEOptions": ".methods",
    "ESDOptions": ".methods",
    "ErasureConfig": ".api",
    "erase_concepts": ".api",
    "apply_uce": ".closed_form",
    "apply_rece": ".closed_form",
    "ESDTrainer": ".training",
    "read_erasure_record": ".folder",
    "load_erasure_weights": ".weights",
    "uce_closed_form": ".uce",
    "uce_edit_matrix": ".uce",
    "rece_adversarial_map": ".rece",
    "esd_target": ".esd",
    "esd_loss": ".esd",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy: ``read_erasure_record`` (used by the evaluation harness on every run) imports no torch model code.
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
