"""``safe-diffusion erase``: UCE, RECE, ESD-x or ESD-u; writes a model folder every command loads as --model."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app

_UCE = "UCE and RECE"
_RECE = "RECE"
_ESD = "ESD (esd-x, esd-u)"


@app.command()
def erase(
    method: str = typer.Option(..., "--method", help="uce, rece, esd-x or esd-u."),
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) folder for the erased model."),
    erase: list[str] = typer.Option(None, "--erase", help="Concept to erase. Repeatable."),
    erase_file: Path = typer.Option(None, help="File with one concept to erase per line."),
    guide_to: list[str] = typer.Option(
        None,
        "--guide-to",
        help="Text erased concepts map to: once, or once per --erase (default: '').",
        rich_help_panel=_UCE,
    ),
    preserve: list[str] = typer.Option(None, "--preserve", help="Concept to keep. Repeatable.", rich_help_panel=_UCE),
    preserve_file: Path = typer.Option(None, help="File with one concept to keep per line.", rich_help_panel=_UCE),
    variant: str = typer.Option(
        None,
        help="UCE as the current script (current; uce's default) or as the paper's WACV-era script "
        "(wacv2024; rece's default). See docs/erasure.md.",
        rich_help_panel=_UCE,
    ),
    lamb: float = typer.Option(None, help="Regulariser λ of eq. 7 (default 0.5).", rich_help_panel=_UCE),
    erase_scale: float = typer.Option(None, help="Erase scale s_e (default 1).", rich_help_panel=_UCE),
    preserve_scale: float = typer.Option(
        None, help="Preserve scale s_p (default: current 1, wacv2024 max(0.1, 1/retained)).", rich_help_panel=_UCE
    ),
    rece_epochs: int = typer.Option(None, help="Find-and-erase epochs (default 3).", rich_help_panel=_RECE),
    rece_lamb: float = typer.Option(None, help="λ of the re-erasure (default 0.1).", rich_help_panel=_RECE),
    rece_erase_scale: float = typer.Option(None, help="s_e of the re-erasure (default 1).", rich_help_panel=_RECE),
    rece_preserve_scale: float = typer.Option(None, help="s_p of the re-erasure (default 0.1).", rich_help_panel=_RECE),
    rece_regularization: float = typer.Option(
        None, help="Regulariser of the embedding search (default 0.1).", rich_help_panel=_RECE
    ),
    rece_selection: str = typer.Option(
        None, help="Epoch kept: last (default) or validation (the official rule).", rich_help_panel=_RECE
    ),
    rece_validation: Path = typer.Option(
        None, help="Validation prompts CSV (default: RECE's own, bundled).", rich_help_panel=_RECE
    ),
    rece_judges: str = typer.Option(None, help="Validation judges (default nudenet).", rich_help_panel=_RECE),
    rece_validation_steps: int = typer.Option(
        None, help="LMS steps of validation images (default 50).", rich_help_panel=_RECE
    ),
    steps: int = typer.Option(None, help="Training steps (default 1000).", rich_help_panel=_ESD),
    lr: float = typer.Option(None, help="Adam learning rate (default 1e-5).", rich_help_panel=_ESD),
    negative_guidance: float = typer.Option(None, help="Negative guidance η (default 1).", rich_help_panel=_ESD),
    start_guidance: float = typer.Option(None, help="CFG scale sampling x_t (default 3).", rich_help_panel=_ESD),
    ddim_steps: int = typer.Option(None, help="DDIM steps sampling x_t (default 50).", rich_help_panel=_ESD),
    resolution: int = typer.Option(None, help="Image size (default the model's).", rich_help_panel=_ESD),
    seed: int = typer.Option(None, help="Seed of the training draws (default 0).", rich_help_panel=_ESD),
    checkpoint_every: int = typer.Option(None, help="Checkpoint interval (default 100).", rich_help_panel=_ESD),
    mixed_precision: str = typer.Option(None, help="no, fp16 or bf16 (default no).", rich_help_panel=_ESD),
    gradient_checkpointing: str = typer.Option(
        None, help="auto (on for SDXL), on or off (default auto).", rich_help_panel=_ESD
    ),
    copy: bool = typer.Option(False, "--copy", help="Copy unchanged components instead of hard-linking them."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Erase concepts from a model's weights (UCE, RECE, ESD-x, ESD-u).

    Writes OUT: a diffusers model folder (load it with --model), its
    erasure.json and the edited weights alone. Rerun the same command to
    resume an interrupted ESD run.
    """
    from ..jobs.erase import erase as run

    config, written = run(
        method,
        model,
        out,
        erase=erase or [],
        erase_file=erase_file,
        guide_to=guide_to,
        preserve=preserve or [],
        preserve_file=preserve_file,
        link=not copy,
        device=device,
        show_progress=not quiet,
        variant=variant,
        rece_selection=rece_selection,
        rece_validation=str(rece_validation) if rece_validation is not None else None,
        rece_judges=rece_judges,
        rece_validation_steps=rece_validation_steps,
        lamb=lamb,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        rece_epochs=rece_epochs,
        rece_lamb=rece_lamb,
        rece_erase_scale=rece_erase_scale,
        rece_preserve_scale=rece_preserve_scale,
        rece_regularization=rece_regularization,
        steps=steps,
        lr=lr,
        negative_guidance=negative_guidance,
        start_guidance=start_guidance,
        ddim_steps=ddim_steps,
        resolution=resolution,
        seed=seed,
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
    )
    if written is not None:
        typer.echo(f"erased {len(config.erase)} concept(s) with {config.label}; wrote {out}")
