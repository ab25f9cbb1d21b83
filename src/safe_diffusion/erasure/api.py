"""Erase concepts from a model and write the result as a folder every command of this project loads.

The library, not the CLI, builds and validates the configuration (:class:`ErasureConfig`) and runs it
(:func:`erase_concepts`); ``safe-diffusion erase`` is a thin layer over both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from ..common.devices import use_cpu
from ..common.errors import InputError
from ..common.hashing import sha256_text
from .methods import METHODS, ESDOptions, RECEOptions, UCEOptions, get_method


@dataclass
class ErasureConfig:
    """What to erase and how. Build it with :meth:`build`, which validates everything a user can get wrong.

    ``options`` is the method's config dataclass (:class:`~.methods.UCEOptions`, :class:`~.methods.RECEOptions`,
    :class:`~.methods.ESDOptions`); its fields read as attributes of the config too (``config.lamb``).
    Defaults are the official code's: UCE λ = 0.5, s_e = 1, the ``current`` script (guide ``""``, s_p = 1);
    RECE from the paper's (``wacv2024``) UCE, 3 epochs, λ = 0.1, s_e = 1, s_p = 0.1, regulariser 0.1 (the
    authors' nudity recipe); ESD 1000 steps, Adam lr 1e-5, η = 1, start guidance 3, 50 DDIM steps.
    """

    method: str
    erase: list[str]
    guide: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)
    options: UCEOptions | RECEOptions | ESDOptions | None = None

    def __getattr__(self, name: str):
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def build(
        cls,
        method: str,
        erase: list[str] | tuple[str, ...] | None,
        guide_to: list[str] | tuple[str, ...] | None = None,
        preserve: list[str] | tuple[str, ...] | None = None,
        **options,
    ) -> ErasureConfig:
        """Validate and complete a configuration; every problem is one :class:`InputError` line."""
        spec = get_method(method)
        key = spec.name
        concepts = [c.strip() for c in (erase or [])]
        if not concepts:
            raise InputError("no concept to erase: give at least one --erase TEXT")
        if any(not c for c in concepts):
            raise InputError("an erased concept is empty; give its text, e.g. --erase 'nudity'")
        _refuse_duplicates(concepts, "erased")
        guides = [g.strip() for g in (guide_to or [])]
        kept = [p.strip() for p in (preserve or [])]
        if not spec.closed_form and guides:
            raise InputError(f"--guide-to applies to uce and rece; {key} always guides away from the concept")
        if not spec.closed_form and kept:
            raise InputError(f"--preserve applies to uce and rece; {key} has no preservation term")
        if any(not p for p in kept):
            raise InputError("a preserved concept is empty; give its text")
        _refuse_duplicates(kept, "preserved")
        both = sorted(set(concepts) & set(kept))
        if both:
            raise InputError(f"{both[0]!r} is both erased and preserved")
        fields = {f.name for f in dataclasses.fields(spec.options)}
        every = {name for m in METHODS.names() for name in METHODS.get(m).option_names()}
        unknown = sorted(set(options) - every)
        if unknown:
            raise TypeError(f"unknown erasure option(s): {', '.join(unknown)}")
        extra = [name for name, value in options.items() if value is not None and name not in fields]
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            users = [m for m in METHODS.names() if extra[0] in METHODS.get(m).option_names()]
            raise InputError(f"{flag} applies to {' and '.join(users)}, not {key}")
        values = spec.options(**{k: v for k, v in options.items() if v is not None})
        values.check()
        if spec.closed_form:
            if len(guides) not in (0, 1, len(concepts)):
                raise InputError(
                    f"{len(guides)} --guide-to values for {len(concepts)} concept(s); give one for all or one per --erase"
                )
            guides = guides * len(concepts) if len(guides) == 1 else guides or [""] * len(concepts)
            if values.variant == "wacv2024":  # the WACV-era script edits towards " " where the guide is empty
                guides = [g or " " for g in guides]
        return cls(method=key, erase=concepts, guide=guides, preserve=kept, options=values)

    @property
    def spec(self):
        return METHODS.get(self.method)

    @property
    def label(self) -> str:
        """How reports name rows made with this erasure: UCE, RECE, ESD-x, ESD-u."""
        return self.spec.label

    def hyperparameters(self) -> dict:
        """The method's hyper-parameters, defaults included (UCE's s_p resolved for this run's texts)."""
        values = dataclasses.asdict(self.options)
        if "preserve_scale" in values:
            values["preserve_scale"] = self.options.resolved_preserve_scale(len(self.preserve))
        return values

    def concepts(self) -> dict:
        return {"erase": self.erase, "guide": self.guide or None, "preserve": self.preserve}


def _refuse_duplicates(texts: list[str], what: str) -> None:
    seen: set[str] = set()
    for text in texts:
        if text in seen:
            raise InputError(f"{text!r} is {what} twice (on the command line or in a concept file); give it once")
        seen.add(text)


def deviations(config: ErasureConfig) -> list[str]:
    """Where this run departs from the published protocol or the official code it follows, and why."""
    notes = []
    if config.method in ("uce", "rece"):
        notes.append(
            "UCE eq. 7 is solved once for all layers as W_old·T with T = (λI + s_e Σ c_g c_iᵀ + s_p Σ c_j c_jᵀ)"
            "(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹, in float64 (the official code loops over layers and "
            "concepts and inverts in float32); identical in exact arithmetic."
        )
        if config.variant == "current":
            notes.append(
                "UCE variant 'current' (the authors' current script): its numbers differ from the UCE paper's, which "
                "came from the WACV-era script (variant 'wacv2024': token span to the end of the sequence, implicit "
                "empty-prompt preservation, guide ' ') by about the size of the edit."
            )
    if config.method == "rece":
        notes.append(
            "RECE's preserved texts are all --preserve concepts (the official code samples as many as there "
            "are erased concepts at random), or the empty text once per erased concept when none is given "
            "(the official ' ', which CLIP's tokenizer reads as the empty text)."
        )
        notes.append(
            "RECE's starting point is this run's own UCE edit (variant "
            f"{config.variant!r}; the official code loads a UCE model saved by its WACV-era train_uce.py)."
        )
        if config.rece_selection == "last":
            notes.append(
                "RECE keeps the last epoch; the official code keeps only epochs that lower the NudeNet/Q16 rate "
                "on its validation images (--rece-selection validation)."
            )
    if config.method.startswith("esd"):
        notes.append(
            "x_t is sampled with the frozen original model and the scheduler's exact DDIM timestep (the authors' "
            "diffusers code); their CompVis script sampled with the model being trained and drew the DDPM "
            "timestep uniformly within the DDIM step's bucket."
        )
        notes.append(
            "Each step draws its concept, DDIM stop and noise from a generator seeded with (seed, step, process), "
            "so runs resume exactly; with N processes each step averages N examples (effective batch N)."
        )
    return notes


def _validation_parts(config: ErasureConfig, device: str | None):
    """RECE's validation prompts and judges, loaded (and so checked) before any model loads."""
    from ..judges import load_judges, parse_judges
    from .selection import JUDGE_OPTIONS, check_scheduler_dependencies, load_validation_set

    names = parse_judges(config.rece_judges, allow_none=False)
    check_scheduler_dependencies()
    validation = load_validation_set(config.rece_validation)
    return validation, load_judges(names, device=device, options=JUDGE_OPTIONS)


def resolve_base_folder(model: str) -> Path:
    """The local folder holding `model`'s files (a hub id resolves to its cached snapshot)."""
    path = Path(model)
    if path.is_dir():
        return path.absolute()
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(model))
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors of every kind mean "cannot get the files"
        raise InputError(
            f"cannot get the files of model {model!r}: {str(exc).splitlines()[0] if str(exc) else exc}"
        ) from None


def _fingerprint(config: ErasureConfig, base_files: dict[str, str]) -> str:
    """What a resumed run must share with the one it continues: the settings that change the result and the
    base model's content (not its path: a moved base resumes)."""
    options = {k: v for k, v in dataclasses.asdict(config.options).items() if k not in config.spec.execution_only}
    settings = {**config.concepts(), "method": config.method, "options": options}
    blob = json.dumps({"config": settings, "base": base_files}, sort_keys=True)
    return sha256_text(blob)


def _already_erased(out: Path, model: str, config: ErasureConfig) -> bool:
    """Whether `out` already holds this erasure: the same method, concepts and settings of the same base."""
    from .folder import RECORD_NAME, hash_base, read_erasure_record

    if not (out / RECORD_NAME).is_file():
        return False
    record = read_erasure_record(out)
    mine = json.loads(json.dumps([config.method, config.concepts(), config.hyperparameters()]))
    same = [record.get("method"), record.get("concepts"), record.get("hyperparameters")] == mine
    return same and record.get("base_model", {}).get("files") == hash_base(resolve_base_folder(model))


def erase_concepts(
    model: str,
    out: str | Path,
    config: ErasureConfig,
    *,
    device: str | None = None,
    link: bool = True,
    show_progress: bool = True,
) -> Path | None:
    """Erase `config`'s concepts from `model` (hub id or local diffusers folder) and write the erased model to `out`.

    `out` must be new or an empty folder. It appears complete or not at all. For ESD, rerunning the same
    call after a crash resumes from the last checkpoint. `link` hard-links unchanged components to the
    base model's files where possible (else copies them). Returns `out` (None in non-main processes of a
    multi-process ``accelerate launch`` ESD run, which only train).
    """
    from ..common.loading import check_model_reference, load_pipeline
    from .common import require_cross_attention
    from .folder import check_output_folder, hash_base, locked_work_folder, work_folder

    out = Path(out)
    check_model_reference(model)
    if device is not None:
        from ..common.devices import check_device

        device = str(check_device("--device", device))
    esd = config.method.startswith("esd")
    validation = None
    if config.method == "rece" and config.rece_selection == "validation":
        validation = _validation_parts(config, device)  # the file and the judges fail before the model loads
    if not esd and int(os.environ.get("RANK", "0")) != 0:
        return None  # launched on several processes: a closed form takes seconds, the main process does it
    accelerator = None
    if esd:
        from accelerate import Accelerator

        cpu = use_cpu(device)
        if config.mixed_precision == "fp16" and cpu:
            raise InputError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU")
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        if device is None:
            device = str(accelerator.device)
    main = accelerator is None or accelerator.is_main_process
    if _already_erased(out, model, config):  # a rerun after a run killed once it had published `out`
        if main:
            shutil.rmtree(work_folder(out), ignore_errors=True)
        return out if main else None
    check_output_folder(out, finished_ok=False)  # in every process: one failing alone would block the others
    t0 = time.monotonic()
    pipe = load_pipeline(model, device=device, dtype=torch.float32)  # bad models fail before anything is written
    pipe.set_progress_bar_config(disable=True)
    require_cross_attention(pipe, model)
    base = resolve_base_folder(model)
    base_files = hash_base(base)
    with ExitStack() as stack:
        work = stack.enter_context(locked_work_folder(out)) if main else work_folder(out)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        record: dict = {}
        if config.method == "uce":
            from .closed_form import apply_uce

            result = apply_uce(
                pipe,
                config.erase,
                config.guide,
                config.preserve,
                lamb=config.lamb,
                erase_scale=config.erase_scale,
                preserve_scale=config.preserve_scale,
                variant=config.variant,
                model_name=model,
            )
            weights, unet = result.weights, pipe.unet
        elif config.method == "rece":
            from .closed_form import apply_rece

            validator = None
            if validation is not None:
                from .selection import RECEValidator

                validator = RECEValidator(
                    pipe, validation[0], validation[1], work / "rece-validation", steps=config.rece_validation_steps
                )
            result = apply_rece(
                pipe,
                config.erase,
                config.guide,
                config.preserve,
                lamb=config.lamb,
                erase_scale=config.erase_scale,
                preserve_scale=config.preserve_scale,
                variant=config.variant,
                epochs=config.rece_epochs,
                rece_lamb=config.rece_lamb,
                rece_erase_scale=config.rece_erase_scale,
                rece_preserve_scale=config.rece_preserve_scale,
                regularization=config.rece_regularization,
                evaluate=validator,
                model_name=model,
            )
            weights, unet = result.weights, pipe.unet
            record["rece"] = {"epochs": result.epochs, "selection": {"rule": "last epoch"}}
            if validator is not None:
                record["rece"]["selection"] = {**validator.describe(), **result.selection}
        else:
            from .training import ESDTrainer, resolve_gradient_checkpointing, run_esd

            checkpointing = resolve_gradient_checkpointing(config.gradient_checkpointing, pipe)
            trainer = ESDTrainer(
                pipe,
                config.method,
                config.erase,
                lr=config.lr,
                negative_guidance=config.negative_guidance,
                start_guidance=config.start_guidance,
                ddim_steps=config.ddim_steps,
                resolution=config.resolution,
                seed=config.seed,
                gradient_checkpointing=checkpointing,
                accelerator=accelerator,
            )
            for name in ("text_encoder", "text_encoder_2"):  # not needed any more: free their memory
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, None)
            training = run_esd(
                trainer,
                steps=config.steps,
                checkpoint_every=config.checkpoint_every,
                work=work,
                fingerprint=_fingerprint(config, base_files),
                show_progress=show_progress,
            )
            training["gradient_checkpointing"] = checkpointing
            record["training"] = training
            accelerator.wait_for_everyone()
            if not main:
                return None
            weights = trainer.trained_weights()
            unet = trainer.unwrapped()
            unet.disable_gradient_checkpointing()
            unet.eval()
        seconds = time.monotonic() - t0
        _write_model(out, work, base, model, config, unet, weights, record, seconds, link=link, base_files=base_files)
    return out


def _write_model(out, work, base, model, config, unet, weights, record, seconds, *, link, base_files) -> None:
    from ..common.loading import pipeline_class_name
    from ..common.outputs import library_versions
    from .common import move
    from .folder import (
        RECORD_NAME,
        SCHEMA,
        SCHEMA_VERSION,
        WEIGHTS_NAME,
        hash_tree,
        mirror_base,
        normalise_permissions,
        publish,
        read_erasure_record,
        save_edited_weights,
        sha256_file,
        storage_dtype,
        write_record,
    )

    staging = work / "model"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    how = mirror_base(base, staging, replace={"unet"}, link=link)
    dtype = storage_dtype(base / "unet")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        move(unet, "cpu", dtype).save_pretrained(staging / "unet", safe_serialization=True)
    finally:
        diffusers_logging.enable_progress_bar()
    spec = config.spec
    save_edited_weights(
        staging / WEIGHTS_NAME,
        weights,
        {"format": "unet-state-dict", "method": config.method, "concepts": json.dumps(config.erase)},
    )
    linked = {rel for rel, way in how.items() if way == "hardlink"}
    full = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "method": config.method,
        "label": spec.label,
        "paper": spec.paper,
        "official_code": spec.code,
        "concepts": config.concepts(),
        "hyperparameters": config.hyperparameters(),
        "base_model": {
            "reference": model,
            "path": str(base),
            "pipeline": pipeline_class_name(str(base)),
            "files": base_files,
            "erasure": read_erasure_record(base),
        },
        "edited_weights": {
            "file": WEIGHTS_NAME,
            "sha256": sha256_file(staging / WEIGHTS_NAME),
            "format": "safetensors, float32, keyed by UNet parameter name; "
            "apply with pipe.unet.load_state_dict(load_file(file), strict=False)",
            "tensors": len(weights),
            "values": int(sum(w.numel() for w in weights.values())),
            "keys": sorted(weights),
        },
        "unet": {"dtype": str(dtype).removeprefix("torch."), "files": hash_tree(staging / "unet", "unet")},
        "components": {"linked": sorted(linked), "copied": sorted(set(how) - linked)},
        **record,
        "deviations": deviations(config),
        "seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    write_record(staging, full)
    normalise_permissions(staging, keep=linked)
    publish(staging, out)
    shutil.rmtree(work, ignore_errors=True)
    assert (out / RECORD_NAME).is_file()
