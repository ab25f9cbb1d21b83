"""Quality metrics: CLIP score, FID and KID against independent computations; caching; resume after SIGKILL.

Everything runs offline on random-weight networks: a tiny CLIP built with ``build_clip`` and a tiny
random convolutional feature extractor (plus torch-fidelity's InceptionV3 architecture with random
weights, where torch-fidelity is installed). Parity is checked in float64.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safe_diffusion.common.errors import InputError
from safe_diffusion.evals import quality as q
from safe_diffusion.testing import RandomFeatureExtractor, build_clip

N_GEN, N_REF = 24, 30
SIZE = 64  # images are resized to SIZE x SIZE before feature extraction (512 by default: slow on a CPU)


def _write_images(folder: Path, n: int, low: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (40, 48) if i % 3 else (48, 40)  # both orientations: the square crop is exercised
        pixels = rng.integers(low, 256 - (60 - low), (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def _prompts(n: int) -> dict[str, str]:
    # The byte-level test tokenizer makes one token per character: prompts over 75 characters are truncated.
    words = ["a red bicycle", "two dogs on a beach at sunset", "a bowl of soup", "a tall clock tower in fog"]
    return {f"{i:03d}.png": " and ".join(words[: 1 + i % 4]) + f" number {i}" * (1 + i % 5) for i in range(n)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    _write_images(root / "gen", N_GEN, 0, seed=1)
    _write_images(root / "ref", N_REF, 40, seed=2)
    clip = build_clip(root / "clip")
    return {"root": root, "gen": root / "gen", "ref": root / "ref", "clip": clip, "prompts": _prompts(N_GEN)}


@pytest.fixture(scope="module")
def scorer64(data):
    return q.ClipScorer(data["clip"], device="cpu", dtype=torch.float64)


# ------------------------------------------------------------------ CLIP score


def _independent_clip_scores(clip_dir: Path, items: list[q.QualityImage]) -> np.ndarray:
    """100 · max(cos, 0) straight from the model's towers and projections, one pair at a time, float64."""
    from transformers import AutoTokenizer, CLIPModel

    from safe_diffusion.judges.q16 import clip_preprocess

    model = CLIPModel.from_pretrained(clip_dir).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    size = model.config.vision_config.image_size
    out = []
    with torch.no_grad():
        for item in items:
            pixels = torch.from_numpy(clip_preprocess(Image.open(item.path).convert("RGB"), size)[None]).double()
            image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
            tokens = tokenizer([item.prompt], truncation=True, max_length=77, return_tensors="pt")
            text = model.text_projection(model.text_model(**tokens).pooler_output)[0]
            cos = float(image @ text / (image.norm() * text.norm()))
            out.append(100.0 * max(cos, 0.0))
    return np.array(out)


def test_clip_score_equals_independent_computation(data, scorer64):
    items = q.folder_images(data["gen"], data["prompts"])
    result = q.evaluate_quality(items, clip_model=scorer64, batch_size=7)
    ours = np.array([result.per_image[it.key]["clip_score"] for it in items])
    expected = _independent_clip_scores(data["clip"], items)
    assert (expected == 0).any() and (expected > 0).any(), "the data must exercise both sides of max(cos, 0)"
    assert any(len(it.prompt) > 75 for it in items), "the data must exercise truncation"
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert result.summary["clip_score"] == pytest.approx(expected.mean(), abs=1e-6)
    assert result.summary["clip_scored"] == N_GEN
    assert result.config["clip"]["dtype"] == "float64"
    assert set(result.config["clip"]["weights_sha256"]) == {"model.safetensors"}


def test_clip_score_agrees_with_torchmetrics_public_api(data, scorer64):
    from torchmetrics.functional.multimodal import clip_score

    items = q.folder_images(data["gen"], data["prompts"])[:3]
    result = q.evaluate_quality(items, clip_model=scorer64)
    for item in items:
        image = torch.from_numpy(np.array(Image.open(item.path).convert("RGB"))).permute(2, 0, 1)
        public = clip_score(image, item.prompt, model_name_or_path=lambda: (scorer64._adapter, scorer64._processor))
        assert result.per_image[item.key]["clip_score"] == pytest.approx(float(public.detach()), abs=1e-6)


# ------------------------------------------------------------------ FID and KID


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _direct_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³, written out."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    m, d = len(x), x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / m**2)


def test_fid_equals_closed_form_frechet_distance(data, tmp_path):
    extractor = RandomFeatureExtractor()
    gen = q.image_features(q.folder_images(data["gen"]), extractor, batch_size=5, image_size=SIZE)
    ref = q.reference_statistics(data["ref"], extractor, cache_dir=tmp_path, image_size=SIZE)
    assert gen.features.shape == (N_GEN, 16) and ref.features.shape == (N_REF, 16)
    fid = q.frechet_distance(gen.features, ref)
    expected = _direct_fid(gen.features, ref.features)
    assert expected > 0.01
    assert fid == pytest.approx(expected, rel=1e-6, abs=1e-9)
    self_fid = q.frechet_distance(gen.features, q.statistics_from_features(gen.features, extractor=None, source={}))
    assert abs(self_fid) < 1e-6
    # evaluate_quality reports the same number, from features it extracts (and persists) itself
    items = q.folder_images(data["gen"])
    whole = q.evaluate_quality(
        items,
        clip_model=None,
        reference=data["ref"],
        feature_extractor=extractor,
        cache_dir=tmp_path,
        batch_size=5,
        image_size=SIZE,
    )
    assert whole.summary["fid"] == pytest.approx(expected, rel=1e-6)
    assert whole.config["fid"]["reference"]["cache_hit"] is True


def test_kid_equals_unbiased_mmd_with_cubic_kernel(data, tmp_path):
    extractor = RandomFeatureExtractor()
    gen = q.image_features(q.folder_images(data["gen"]), extractor, image_size=SIZE)
    ref_all = q.reference_statistics(data["ref"], extractor, cache_dir=tmp_path, image_size=SIZE)
    ref = q.statistics_from_features(ref_all.features[:N_GEN], extractor=extractor.identity, source={})
    # one subset of every image: the random subsets are then the whole sets (MMD² is permutation-invariant)
    kid = q.kernel_distance(gen.features, ref, subsets=1, subset_size=N_GEN)
    expected = _direct_kid(ref.features, gen.features)
    assert abs(expected) > 1e-4
    assert kid["kid"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert kid["subset_size"] == N_GEN
    # random subsets: seeded, repeatable, and the global generator is left as it was
    state = torch.get_rng_state()
    a = q.kernel_distance(gen.features, ref_all, subsets=5, subset_size=10, seed=3)
    b = q.kernel_distance(gen.features, ref_all, subsets=5, subset_size=10, seed=3)
    assert a == b and a["kid_std"] > 0
    assert torch.equal(state, torch.get_rng_state())
    assert q.kernel_distance(gen.features, ref_all, subset_size=10_000)["subset_size"] == N_GEN


class CountingExtractor(RandomFeatureExtractor):
    calls = 0

    def features(self, images):
        type(self).calls += 1
        return super().features(images)


def test_reference_statistics_are_cached_by_content_and_extractor(data, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for p in sorted(data["ref"].iterdir())[:10]:
        (ref / p.name).write_bytes(p.read_bytes())
    cache = tmp_path / "cache"
    CountingExtractor.calls = 0
    first = q.reference_statistics(ref, CountingExtractor(), cache_dir=cache, batch_size=4, image_size=SIZE)
    assert not first.cache_hit and CountingExtractor.calls == 3
    assert not list(cache.glob("*.records")), "per-image records are removed once the statistics are written"
    second = q.reference_statistics(ref, CountingExtractor(), cache_dir=cache, batch_size=4, image_size=SIZE)
    assert second.cache_hit and CountingExtractor.calls == 3, "a cache hit must not run the extractor"
    assert second.source["kind"] == "folder" and second.source["path"] == str(ref)
    assert second.source["content_sha256"] == first.source["content_sha256"]
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_array_equal(first.features, second.features)
    # another extractor, or changed content, is another key
    q.reference_statistics(ref, CountingExtractor(seed=1), cache_dir=cache, batch_size=4, image_size=SIZE)
    assert CountingExtractor.calls == 6
    Image.new("RGB", (40, 40), (9, 9, 9)).save(ref / "000.png")
    changed = q.reference_statistics(ref, CountingExtractor(), cache_dir=cache, batch_size=4, image_size=SIZE)
    assert not changed.cache_hit and CountingExtractor.calls == 9
    assert len(list(cache.glob("*.npz"))) == 3
    # a statistics file made with another extractor is refused
    npz = next(cache.glob("*.npz"))
    other = RandomFeatureExtractor(seed=5)
    with pytest.raises(InputError, match="another feature extractor"):
        q.load_statistics(npz, other)


def test_statistics_files_from_other_tools_load_without_pickle(data, tmp_path):
    extractor = RandomFeatureExtractor()
    feats = q.image_features(q.folder_images(data["ref"]), extractor, image_size=SIZE).features.astype(np.float64)
    path = tmp_path / "pytorch_fid_style.npz"
    np.savez(path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))  # what pytorch-fid writes
    stats = q.reference_statistics(path, extractor)
    assert stats.features is None and stats.extractor is None and stats.source["kind"] == "statistics"
    gen = q.image_features(q.folder_images(data["gen"]), extractor, image_size=SIZE).features
    assert q.frechet_distance(gen, stats) == pytest.approx(_direct_fid(gen, feats), rel=1e-6)
    assert q.kernel_distance(gen, stats) is None  # KID needs the reference's features
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=feats.mean(0))
    with pytest.raises(InputError, match="missing array"):
        q.load_statistics(bad)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(InputError, match="not a readable"):
        q.load_statistics(pickled)


# ------------------------------------------------------------------ persistence and resume


def test_folder_records_are_a_journal_of_durable_batches(tmp_path):
    from safe_diffusion.records.journal import Journal

    records = q.Records.in_folder(tmp_path / "rec")
    assert records.get() == {} and not (tmp_path / "rec").exists()  # reading writes nothing
    records.put({"a": {"x": 1}, "b": {"x": 2}})
    records.put({"b": {"x": 3}})
    assert records.get() == {"a": {"x": 1}, "b": {"x": 3}}
    (segment,) = Journal(tmp_path / "rec").segments()
    with open(segment, "ab") as f:
        f.write(b'0badc0de\t["records","c",{"x"')  # a batch cut short by a kill: ignored, recomputed
    assert q.Records.in_folder(tmp_path / "rec").get() == {"a": {"x": 1}, "b": {"x": 3}}
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        q.Records.in_folder(tmp_path / "file")
    vector = np.array([1.5, -2.25, 3e-8], dtype=np.float32)
    np.testing.assert_array_equal(q.decode_vector(q.encode_vector(vector), 3), vector)


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from safe_diffusion.evals import quality as q
    from safe_diffusion.testing import RandomFeatureExtractor

    gen, ref, clip, prompts, records, cache = sys.argv[1:7]
    images = q.folder_images(gen, json.load(open(prompts)))
    q.evaluate_quality(
        images, clip_model=clip, reference=ref, feature_extractor=RandomFeatureExtractor(delay=0.25),
        records=q.Records.in_folder(records), cache_dir=cache, batch_size=4, image_size=64, kid_subset_size=10,
        device="cpu",
    )
    print("finished")
    """
)


def _feature_keys(records_dir: Path) -> int:
    return sum(1 for k in q.Records.in_folder(records_dir).get() if k.startswith("features/"))


def test_resume_after_sigkill_gives_the_uninterrupted_numbers(data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(data["prompts"]))
    records, cache = tmp_path / "records", tmp_path / "cache"
    args = [str(data["gen"]), str(data["ref"]), str(data["clip"]), str(prompts), str(records), str(cache)]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _feature_keys(records) < 8:  # two of the six batches of generated-image features are stored
            assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[1].decode()[-2000:]}"
            assert time.monotonic() < deadline, "no features were stored in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _feature_keys(records)
    assert 8 <= done < N_GEN

    def run(records_dir: Path, cache_dir: Path, extractor) -> q.QualityResult:
        return q.evaluate_quality(
            q.folder_images(data["gen"], data["prompts"]),
            clip_model=data["clip"],
            reference=data["ref"],
            feature_extractor=extractor,
            records=q.Records.in_folder(records_dir),
            cache_dir=cache_dir,
            batch_size=4,
            image_size=SIZE,
            kid_subset_size=10,
            device="cpu",
        )

    CountingExtractor.calls = 0
    resumed = run(records, cache, CountingExtractor())
    assert CountingExtractor.calls == (N_GEN - done) // 4, "only the missing batches are computed again"
    uninterrupted = run(tmp_path / "records2", tmp_path / "cache2", RandomFeatureExtractor())
    assert resumed.summary == uninterrupted.summary
    assert resumed.per_image == uninterrupted.per_image
    assert resumed.summary["fid"] is not None and resumed.summary["kid"] is not None
    assert resumed.summary["clip_scored"] == N_GEN


def test_unreadable_images_are_reported_not_fatal(data, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    for p in sorted(data["gen"].iterdir())[:6]:
        (gen / p.name).write_bytes(p.read_bytes())
    (gen / "005.png").write_bytes((gen / "005.png").read_bytes()[:60])  # truncated
    result = q.evaluate_quality(
        q.folder_images(gen, data["prompts"]),
        clip_model=data["clip"],
        reference=data["ref"],
        feature_extractor=RandomFeatureExtractor(),
        cache_dir=tmp_path / "cache",
        image_size=SIZE,
        device="cpu",
    )
    assert list(result.failed) == ["005.png"] and "unreadable image" in result.failed["005.png"]
    assert result.summary["clip_scored"] == 5 and result.summary["fid_images"] == 5
    json.dumps(result.to_dict(), allow_nan=False)


def test_bad_input_is_one_line(data, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        q.folder_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no images"):
        q.folder_images(tmp_path / "empty")
    with pytest.raises(InputError, match="neither a folder"):
        q.reference_statistics(tmp_path / "nothing", RandomFeatureExtractor())
    with pytest.raises(InputError, match="unknown feature extractor"):
        q.make_feature_extractor("vgg")
    with pytest.raises(InputError, match="cannot load CLIP"):
        q.ClipScorer(tmp_path / "empty", device="cpu")
    with pytest.raises(InputError, match="unique"):
        item = q.folder_images(data["gen"])[0]
        q.evaluate_quality([item, item], clip_model=None)


# ------------------------------------------------------------------ the standard Inception path

needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity absent")


class _WritesAFile:
    """Unpickling this creates a file: proof that a weights file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@needs_fidelity
def test_inception_features_load_local_weights_weights_only(tmp_path):
    from safe_diffusion.common.hashing import sha256_file as file_sha256
    from safe_diffusion.testing import build_inception_weights

    weights = build_inception_weights(tmp_path / "inception.pth")
    extractor = q.InceptionV3Features(weights, device="cpu")
    described = extractor.describe()
    assert described["weights"]["sha256"] == file_sha256(weights)
    assert described["weights"]["published"] is False
    assert described["resize_to_299"].startswith("TF1")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    feats = extractor.features(images)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert np.abs(feats[0] - feats[1]).max() > 0
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None
    # a file that would run code when unpickled is refused, and nothing runs
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _WritesAFile(marker)}, evil)
    with pytest.raises(InputError, match="cannot load Inception weights"):
        q.InceptionV3Features(evil, device="cpu")
    assert not marker.exists()
    with pytest.raises(InputError, match="is not a file"):
        q.InceptionV3Features(tmp_path / "missing.pth")


def test_inception_weights_that_cannot_be_downloaded_name_the_option_that_fixes_it(tmp_path, monkeypatch):
    """Offline, with no cached weights: one line naming --inception-weights and where the cache expects the file."""
    import importlib
    import urllib.error

    from safe_diffusion.evals.quality.fidelity import import_torch_fidelity

    assert import_torch_fidelity()  # torch-fidelity's extractor module without its torchvision-only siblings
    fidelity = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", offline)
    with pytest.raises(InputError) as err:
        q.InceptionV3Features(device="cpu")
    message = str(err.value)
    assert "\n" not in message and "cannot download the Inception weights" in message
    assert "--inception-weights" in message and str(tmp_path / "hub" / "checkpoints") in message
