"""The erase job: concepts out of a model's weights, written as a model folder every command loads
(``safe-diffusion erase``; the methods are :mod:`safe_diffusion.erasure`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..common.loading import check_model_reference
from ..common.validation import read_lines
from ..erasure.api import ErasureConfig, erase_concepts
from ..erasure.folder import check_output_folder


def read_concepts(path: str | Path | None, what: str) -> list[str]:
    """One concept per line of `path` (blank lines and # comments skipped); none without a file."""
    if path is None:
        return []
    return read_lines(path, f"{what} file", empty="lists no concept")


def erase(
    method: str,
    model: str,
    out: str | Path,
    *,
    erase: Sequence[str] = (),
    erase_file: str | Path | None = None,
    guide_to: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    preserve_file: str | Path | None = None,
    link: bool = True,
    device: str | None = None,
    show_progress: bool = True,
    **options,
) -> tuple[ErasureConfig, Path | None]:
    """Erase the concepts `erase` (and those of `erase_file`) from `model` with `method` (uce, rece, esd-x,
    esd-u) and write the erased model to the new or empty folder `out`.

    `options` are the method's hyper-parameters (:class:`~safe_diffusion.erasure.api.ErasureConfig`; None
    keeps a default). Everything is checked before the model loads. Returns the configuration and `out`
    (None in the non-main processes of a multi-process ESD run).
    """
    concepts = [*erase, *read_concepts(erase_file, "--erase-file")]
    kept = [*preserve, *read_concepts(preserve_file, "--preserve-file")]
    config = ErasureConfig.build(method, concepts, guide_to=guide_to, preserve=kept, **options)
    check_model_reference(model)
    out = Path(out)
    check_output_folder(out)
    return config, erase_concepts(model, out, config, device=device, link=link, show_progress=show_progress)
