"""COCO captions as prompts: annotation files sampled by the documented rule, caption tables, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safe_diffusion.common.errors import InputError
from safe_diffusion.evals.coco import SUBSETS, load_coco_captions, sample_annotations, val2014_file_name


def _annotations(n_images: int = 40, seed: int = 7) -> dict:
    """A small file shaped like captions_val2014.json: image ids out of order, 4-6 captions per image."""
    rng = np.random.default_rng(seed)
    image_ids = rng.choice(600_000, size=n_images, replace=False).tolist()
    annotations, next_id = [], 1000
    for image_id in image_ids:
        for k in range(int(rng.integers(4, 7))):
            annotations.append({"image_id": image_id, "id": next_id, "caption": f"  Image {image_id}\ncaption {k}. "})
            next_id += int(rng.integers(1, 5))
    order = rng.permutation(len(annotations))
    return {"images": [{"id": i} for i in image_ids], "annotations": [annotations[i] for i in order]}


def _expected(doc: dict, size: int, seed: int) -> list[tuple[int, int, str]]:
    """The documented rule, written out independently of the loader."""
    by_image: dict[int, list] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ids = sorted(by_image)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    picks = rng.integers(0, [len(by_image[ids[j]]) for j in order])
    out = []
    for j, k in list(zip(order, picks))[:size]:
        ann = sorted(by_image[ids[j]], key=lambda a: a["id"])[k]
        out.append((ids[j], ann["id"], " ".join(ann["caption"].split())))
    return out


def test_annotation_file_is_sampled_by_the_documented_rule(tmp_path):
    doc = _annotations()
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(doc))
    got = load_coco_captions(path, subset=25, seed=3)
    assert [(c.image_id, c.caption_id, c.text) for c in got.captions] == _expected(doc, 25, 3)
    assert [c.index for c in got.captions] == list(range(25))
    assert len({c.image_id for c in got.captions}) == 25, "one caption per image"
    assert got.captions[0].text.startswith("Image ") and "\n" not in got.captions[0].text
    assert got.source["format"] == "coco-annotations" and got.source["subset"] == 25 and got.source["seed"] == 3
    assert len(got.source["sha256"]) == 64
    # smaller subsets are prefixes of larger ones; another seed is another sample; the same seed is the same
    small = load_coco_captions(path, subset=10, seed=3)
    assert small.captions == got.captions[:10]
    assert load_coco_captions(path, subset=25, seed=4).prompts != got.prompts
    assert load_coco_captions(path, subset="25", seed=3).prompts == got.prompts


def test_named_subsets_and_the_default(tmp_path):
    assert SUBSETS == {"30k": 30_000, "10k": 10_000, "5k": 5_000}
    assert val2014_file_name(391895) == "COCO_val2014_000000391895.jpg"
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(_annotations(n_images=12)))
    with pytest.raises(InputError, match="needs 30000 images; the file has 12"):
        load_coco_captions(path)  # the default for an annotation file is the 30k protocol
    with pytest.raises(InputError, match="needs 5000 images"):
        load_coco_captions(path, subset="5k")
    assert len(sample_annotations(json.loads(path.read_text()), None)) == 12


def test_caption_tables(tmp_path):
    rows = [{"image_id": 10 + i, "id": 500 + i, "caption": f"a caption {i}"} for i in range(20)]
    csv_path = tmp_path / "coco_30k.csv"
    csv_path.write_text(
        "image_id,id,caption\n" + "".join(f'{r["image_id"]},{r["id"]},"{r["caption"]}"\n' for r in rows)
    )
    table = load_coco_captions(csv_path)
    assert table.prompts == [r["caption"] for r in rows]
    assert (table.captions[3].image_id, table.captions[3].caption_id) == (13, 503)
    assert table.source["format"] == "csv" and table.source["subset"] == 20

    pd = pytest.importorskip("pandas")
    parquet = tmp_path / "coco.parquet"
    pd.DataFrame({"prompt": [r["caption"] for r in rows]}).to_parquet(parquet)
    assert load_coco_captions(parquet).prompts == table.prompts

    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps([r["caption"] for r in rows]))
    assert load_coco_captions(json_list).prompts == table.prompts
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r["caption"]}) + "\n" for r in rows))
    assert load_coco_captions(jsonl).prompts == table.prompts

    sub = load_coco_captions(csv_path, subset=5, seed=1)
    order = np.random.default_rng(1).permutation(20)[:5]
    assert sub.prompts == [rows[i]["caption"] for i in order]
    assert [c.index for c in sub.captions] == list(range(5))


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("{not json", "a.json", "not a readable JSON"),
        (json.dumps({"annotations": [{"id": 1}]}), "a.json", "no image_id or caption"),
        (json.dumps({"annotations": []}), "a.json", "no 'annotations' list"),
        ("image_id,caption\n1,\n", "a.csv", "empty caption"),
        ("image_id,title\n1,x\n", "a.csv", "no caption column"),
        ("caption\n", "a.csv", "has no captions"),
        ("image_id,caption\nabc,x\n", "a.csv", "image_id 'abc' is not an integer"),
        (json.dumps({"rows": 3}), "a.json", "expected COCO annotations"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_coco_captions(path)


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_coco_captions(tmp_path / "missing.json")
    path = tmp_path / "c.csv"
    path.write_text("caption\na\nb\n")
    with pytest.raises(InputError, match="unknown COCO subset"):
        load_coco_captions(path, subset="lots")
    with pytest.raises(InputError, match="positive number"):
        load_coco_captions(path, subset=0)
    with pytest.raises(InputError, match="the file has 2"):
        load_coco_captions(path, subset=3)
    with pytest.raises(InputError, match="seed"):
        load_coco_captions(path, seed=-1)
    (tmp_path / "latin1.csv").write_bytes("caption\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_coco_captions(tmp_path / "latin1.csv")
