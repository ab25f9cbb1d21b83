"""``safe-diffusion audit DIR``: run the I2P classifiers over any folder of images (Q16's dataset-documentation use)."""

from __future__ import annotations

import html
from pathlib import Path

import typer

from ..errors import InputError
from . import app

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@app.command()
def audit(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="report.html; the CSV is written next to it."),
    classifiers: str = typer.Option("q16,nudenet", help="Comma-separated: q16, nudenet."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16: hub id or local folder."),
    show_unsafe: bool = typer.Option(False, help="Show flagged images unblurred in the report."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx (default: the bundled 320n)."),
    device: str = typer.Option(None, help="Device for Q16."),
) -> None:
    """Per-image flags and scores, a summary, and a CSV."""
    import csv
    import io

    from ..judges import load_judges, parse_judges
    from ..i2p.report import thumbnail
    from ..outputs import atomic_write_bytes

    names = parse_judges(classifiers)
    if not names:
        raise InputError("--classifiers: name at least one classifier")
    if not folder.exists():
        raise InputError(f"folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder")
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {str(out)!r} must end in .html")
    if not out.parent.exists():
        raise InputError(f"folder {str(out.parent)!r} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"folder {str(folder)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError):
            raise InputError(f"{str(p)!r} is not a readable image") from None
    if device is None:
        from ..loading import default_device

        device = default_device()
    clfs = load_judges(names, device=device, options={"q16": {"model": q16_model}, "nudenet": {"model": nudenet_model}})
    rows = [{"image": str(p.relative_to(folder))} for p in paths]
    for clf in clfs:
        for row, judgment in zip(rows, clf.judge(paths)):
            row[clf.name] = judgment.unsafe
            for k, v in judgment.scores.items():
                row[f"{clf.name}_{k}"] = round(v, 6)
    for row in rows:
        row["unsafe"] = any(row[n] for n in names)
    columns = ["image", *names, "unsafe"] + sorted({k for r in rows for k in r} - {"image", "unsafe", *names})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = out.with_suffix(".csv")
    flagged = sum(r["unsafe"] for r in rows)
    summary = {n: sum(bool(r[n]) for r in rows) for n in names}
    table = "".join(
        f"<tr><td>{html.escape(r['image'])}</td>"
        + "".join(f"<td>{'flagged' if r[n] else ''} {r.get(f'{n}_score', 0):.3f}</td>" for n in names)
        + f"<td><img src='data:image/png;base64,{thumbnail(str(folder / r['image']), r['unsafe'], show_unsafe, 96)}'></td></tr>"
        for r in rows
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Image audit</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px}}table{{border-collapse:collapse}}</style></head><body>
<h1>Image audit of {html.escape(str(folder))}</h1>
<p>{len(rows)} images; {flagged} flagged by any classifier ({html.escape(', '.join(f'{n}: {c}' for n, c in summary.items()))}).
{'' if show_unsafe else 'Flagged images are blurred.'}</p>
<table><tr><th>image</th>{''.join(f'<th>{n} (score)</th>' for n in names)}<th>preview</th></tr>{table}</table></body></html>"""
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_bytes(out, page.encode())
    typer.echo(f"{len(rows)} image(s), {flagged} flagged; wrote {out} and {csv_path}")
