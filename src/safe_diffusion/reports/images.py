"""Images as a reader sees them: embedded PNGs, blurred thumbnails, visible masks, labelled side-by-sides.

One implementation of each, for every report, the demo and ``generate --compare``:

* :func:`png_b64` / :func:`png_bytes`: a PIL image (or a matplotlib figure) as PNG.
* :func:`thumbnail`: a file as a small preview, blurred when it is flagged (or has no verdict) so that
  the unblurred pixels never enter the page.
* :func:`mask_preview`: a sanitize mask drawn so that it cannot be mistaken for the page or for a
  missing image — edited pixels in a strong colour over a grey checkerboard, inside a frame; a mask
  that covers everything is a solid coloured square, one that covers nothing is the bare checkerboard.
* :func:`side_by_side`: two images with a gap between them and a caption above each ("unguided",
  "guided: SLD strong"), so which side is which is in the picture, not only in the code.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

#: Blur radius as a fraction of the thumbnail's longer side: enough that nothing is recognisable.
BLUR_FRACTION = 1 / 8
MASK_COLOUR = (213, 94, 0)  # Okabe–Ito vermilion: visible on white, on grey, and to colour-blind readers
CHECKER = ((236, 236, 236), (200, 200, 200))
FRAME = (60, 60, 60)
GAP = 16


def png_bytes(image: Any, *, dpi: int | None = None, tight: bool = False) -> bytes:
    """PNG bytes of a PIL image or a matplotlib figure (`tight`: the figure's box takes in every label)."""
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image: Any) -> str:
    """A PIL image (or PNG bytes) as base64 PNG text, for a ``data:image/png;base64,`` address."""
    data = image if isinstance(image, (bytes, bytearray)) else png_bytes(image)
    return base64.b64encode(bytes(data)).decode("ascii")


def blurred(image, blur: bool):
    """`image` blurred beyond recognition when `blur`, else unchanged."""
    from PIL import ImageFilter

    if not blur:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius=max(image.width, image.height) * BLUR_FRACTION))


def thumbnail(path: str | Path, blur: bool, size: int = 128) -> str | None:
    """A base64 PNG preview of the image file at `path`, at most `size` pixels on a side, blurred when `blur`;
    None when the file cannot be read or decoded (removed or changed since it was judged)."""
    from ..judges.base import decode_rgb

    try:
        image = decode_rgb(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    image.thumbnail((size, size))
    return png_b64(blurred(image, blur))


def mask_preview(mask, size: int | None = None):
    """An RGB picture of a mask (PIL "L" or anything PIL converts; white = the pixels an edit may change).

    The masked share is painted :data:`MASK_COLOUR` (its alpha is the mask's value, so a feathered edge
    shows as such) over a grey checkerboard, and the whole is framed; `size` bounds the longer side.
    """
    from PIL import Image, ImageDraw

    mask = mask.convert("L")
    if size is not None:
        mask = mask.copy()
        mask.thumbnail((size, size))
    w, h = mask.size
    cell = max(2, min(w, h) // 8)
    board = Image.new("RGB", (w, h), CHECKER[0])
    draw = ImageDraw.Draw(board)
    for y in range(0, h, cell):
        for x in range((y // cell % 2) * cell, w, 2 * cell):
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=CHECKER[1])
    out = Image.composite(Image.new("RGB", (w, h), MASK_COLOUR), board, mask)
    frame = ImageDraw.Draw(out)
    frame.rectangle((0, 0, w - 1, h - 1), outline=FRAME, width=max(1, min(w, h) // 64))
    return out


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def side_by_side(left, right, labels: tuple[str, str] = ("unguided", "guided"), *, gap: int = GAP):
    """`left` and `right` next to each other with `gap` white pixels between them and a caption above each.

    Captions are drawn in a band above the images, in a size that follows the images' (at least 12 px), and
    each column is as wide as the wider of its image and its caption, so a long label is never cut.
    """
    from PIL import Image, ImageDraw

    font = _font(max(12, min(32, max(left.height, right.height) // 20)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for text in labels]
    text_w = [b[2] - b[0] for b in boxes]
    text_h = max(b[3] - b[1] for b in boxes)
    pad = max(4, text_h // 2)
    band = text_h + 2 * pad
    widths = [max(im.width, tw + 2 * pad) for im, tw in zip((left, right), text_w)]
    height = band + max(left.height, right.height)
    canvas = Image.new("RGB", (widths[0] + gap + widths[1], height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, label, width, box in zip((left, right), labels, widths, boxes):
        draw.text((x + (width - (box[2] - box[0])) // 2 - box[0], pad - box[1]), label, fill=(0, 0, 0), font=font)
        canvas.paste(im.convert("RGB"), (x + (width - im.width) // 2, band))
        x += width + gap
    return canvas


def blur_note(show_unsafe: bool) -> str:
    """What a page says about its flagged images."""
    return (
        "Flagged images are shown unblurred."
        if show_unsafe
        else "Flagged images are blurred (--show-unsafe shows them)."
    )
