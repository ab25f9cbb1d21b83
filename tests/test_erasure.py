"""UCE, RECE and ESD on tiny random-weight models: parity with independent float64 computations of the
papers' closed forms, what changes and what does not, and the output folder."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from safe_diffusion.common.errors import InputError
from safe_diffusion.erasure import ErasureConfig, erase_concepts, load_erasure_weights, read_erasure_record

ERASE = ["nudity", "violence"]
GUIDE = ["", "a dog"]
PRESERVE = ["a cat", "a red house"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _unet_state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def _edited(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "erasure_weights.safetensors"))


def _eq7(w, erase, targets, preserve, preserve_targets, lamb, se, sp):
    """UCE eq. 7 term by term with an explicit inverse, in float64."""
    d = w.shape[1]
    left = lamb * w.clone()
    right = lamb * torch.eye(d, dtype=torch.float64)
    for c, v in zip(erase, targets):
        left += se * torch.outer(v, c)
        right += se * torch.outer(c, c)
    for c, v in zip(preserve, preserve_targets):
        left += sp * torch.outer(v, c)
        right += sp * torch.outer(c, c)
    return left @ torch.inverse(right)


class Texts:
    """Independent float64 text embeddings, straight from transformers (no diffusers encode_prompt)."""

    def __init__(self, folder, sdxl=False):
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        self.tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        self.encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float64)]
        if sdxl:
            self.encoders.append(
                CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float64)
            )
        self.sdxl = sdxl

    @torch.no_grad()
    def sequence(self, text):
        ids = self.tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        if self.sdxl:  # both encoders' penultimate layers, concatenated (as SDXL conditions its UNet)
            hidden = [e(ids.input_ids, output_hidden_states=True).hidden_states[-2][0] for e in self.encoders]
            return torch.cat(hidden, dim=-1), int(ids.attention_mask.sum())
        return self.encoders[0](ids.input_ids).last_hidden_state[0], int(ids.attention_mask.sum())

    def last_token(self, text):
        seq, length = self.sequence(text)
        return seq[length - 2]  # the last token before end-of-text (the start token for "")


def _reference_uce(base_state, names, texts, erase, guide, preserve, lamb=0.5, se=1.0, sp=1.0):
    c_e = [texts.last_token(t) for t in erase]
    c_g = [texts.last_token(t) for t in guide]
    c_p = [texts.last_token(t) for t in preserve]
    out = {}
    for name in names:
        w = base_state[name].double()
        out[name] = _eq7(w, c_e, [w @ c for c in c_g], c_p, [w @ c for c in c_p], lamb, se, sp)
    return out


def _wacv2024_edit_model(
    base_state, names, texts, old_texts, new_texts, retain_texts, lamb=0.5, erase_scale=1.0, preserve_scale=None
):
    """Oracle: a port of the WACV-era official ``edit_model`` (rohitgandikota/unified-concept-editing,
    train-scripts/train_erase.py at f7222e6, technique 'replace', with_to_k=True), written here from its
    math in float64, layer by layer and text by text as there.

    Per (old, new) pair: both tokenised to 77 tokens; i = attention-mask length − 2 for each; the rows
    old[i_o : 77 − max(0, far − i_o)] and new[i_n : 77 − max(0, far − i_n)] (far = max(i_o, i_n)) are
    paired, each adding s_e·(W new_k)(old_k)ᵀ and s_e·old_k old_kᵀ. Its __main__ always retains '' before
    the user's texts, each over all 77 tokens, with s_p = max(0.1, 1/len(retained)); an empty guide is ' '.
    """
    new_texts = [t if t else " " for t in new_texts]
    retained = ["", *retain_texts]
    if preserve_scale is None:
        preserve_scale = max(0.1, 1 / len(retained))
    out = {}
    for name in names:
        w = base_state[name].double()
        mat1 = lamb * w.clone()
        mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for old, new in zip(old_texts, new_texts):
            old_seq, old_len = texts.sequence(old)
            new_seq, new_len = texts.sequence(new)
            i_old, i_new = old_len - 2, new_len - 2
            far = max(i_old, i_new)
            old_rows = old_seq[i_old : len(old_seq) - max(0, far - i_old)]
            new_rows = new_seq[i_new : len(new_seq) - max(0, far - i_new)]
            for c, v in zip(old_rows, new_rows @ w.T):
                mat1 += erase_scale * torch.outer(v, c)
                mat2 += erase_scale * torch.outer(c, c)
        for text in retained:
            seq, _ = texts.sequence(text)
            for c in seq:
                mat1 += preserve_scale * torch.outer(w @ c, c)
                mat2 += preserve_scale * torch.outer(c, c)
        out[name] = mat1 @ torch.inverse(mat2)
    return out


def _xattn_kv(state) -> list[str]:
    return sorted(k for k in state if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k)


@pytest.fixture(scope="module")
def uce_model(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("uce") / "model"
    config = ErasureConfig.build("uce", ERASE, guide_to=GUIDE, preserve=PRESERVE, variant="current")
    erase_concepts(str(tiny_checkpoint), out, config, device="cpu", show_progress=False)
    return out


@pytest.fixture(scope="module")
def texts(tiny_checkpoint):
    return Texts(tiny_checkpoint)


def test_uce_equals_eq7_computed_independently_in_float64(tiny_checkpoint, uce_model, texts):
    base, edited, ours = _unet_state(tiny_checkpoint), _edited(uce_model), _unet_state(uce_model)
    names = _xattn_kv(base)
    assert sorted(edited) == names and len(names) == 8  # every cross-attention key and value projection
    reference = _reference_uce(base, names, texts, ERASE, GUIDE, PRESERVE)
    for name in names:
        assert _rel(edited[name], reference[name]) <= 1e-5, name
        assert torch.equal(ours[name], edited[name])  # the UNet holds exactly the exchanged weights
        assert _rel(edited[name], base[name]) > 1e-2  # and they did change
    for name in base.keys() - set(names):
        assert torch.equal(ours[name], base[name]), f"{name} changed"


def test_uce_wacv2024_equals_a_port_of_the_wacv_era_official_function(tiny_checkpoint, uce_model, texts, tmp_path):
    """--variant wacv2024 against the WACV-era edit_model (ported in float64 above): within 1e-4 of the
    edit's own size, while the current variant differs from it by a sizeable part of the edit."""
    out = tmp_path / "wacv"
    config = ErasureConfig.build("uce", ERASE, guide_to=GUIDE, preserve=PRESERVE, variant="wacv2024")
    erase_concepts(str(tiny_checkpoint), out, config, device="cpu", show_progress=False)
    base, edited, current = _unet_state(tiny_checkpoint), _edited(out), _edited(uce_model)
    names = _xattn_kv(base)
    reference = _wacv2024_edit_model(base, names, texts, ERASE, GUIDE, PRESERVE)
    for name in names:
        size = (reference[name] - base[name].double()).norm()
        assert float((edited[name].double() - reference[name]).norm() / size) <= 1e-4, name
        assert float((current[name].double() - reference[name]).norm() / size) > 0.05, name
    record = read_erasure_record(out)
    assert record["hyperparameters"]["variant"] == "wacv2024"
    assert record["hyperparameters"]["preserve_scale"] == pytest.approx(1 / 3)  # '', 'a cat', 'a red house'
    assert record["concepts"]["guide"] == [" ", "a dog"]
    assert not any("variant 'current'" in d for d in record["deviations"])
    assert any("variant 'current'" in d for d in read_erasure_record(uce_model)["deviations"])


def test_uce_moves_erased_concepts_and_keeps_preserved_ones(tiny_checkpoint, uce_model, texts):
    base, edited = _unet_state(tiny_checkpoint), _edited(uce_model)
    erased = [texts.last_token(t) for t in ERASE]
    kept = [texts.last_token(t) for t in PRESERVE]
    guide = texts.last_token(GUIDE[1])
    for name in _xattn_kv(base):
        old, new = base[name].double(), edited[name].double()
        moved = min(float((new @ c - old @ c).norm() / (old @ c).norm()) for c in erased)
        stayed = max(float((new @ c - old @ c).norm() / (old @ c).norm()) for c in kept)
        assert stayed < 0.1 * moved, (name, stayed, moved)
        # "violence" now reads closer to what "a dog" read than to what it read itself
        assert (new @ erased[1] - old @ guide).norm() < (new @ erased[1] - old @ erased[1]).norm()


def test_uce_on_sdxl_uses_both_text_encoders(tmp_path):
    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.testing import build_sdxl_checkpoint

    base = build_sdxl_checkpoint(tmp_path / "sdxl")
    out = tmp_path / "erased"
    erase_concepts(
        str(base), out, ErasureConfig.build("uce", ["nudity"], preserve=["a cat"]), device="cpu", show_progress=False
    )
    state, edited = _unet_state(base), _edited(out)
    names = _xattn_kv(state)
    assert sorted(edited) == names and edited[names[0]].shape[1] == 64  # 32 + 32: the concatenated embedding
    reference = _reference_uce(state, names, Texts(base, sdxl=True), ["nudity"], [""], ["a cat"])
    for name in names:
        assert _rel(edited[name], reference[name]) <= 1e-5, name
    pipe = load_pipeline(str(out), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert read_erasure_record(out)["base_model"]["pipeline"] == "StableDiffusionXLPipeline"


def test_rece_runs_its_epochs_on_cross_attention_only(tiny_checkpoint, tmp_path):
    out = tmp_path / "rece"
    config = ErasureConfig.build("rece", ["nudity"], rece_epochs=2)
    erase_concepts(str(tiny_checkpoint), out, config, device="cpu", show_progress=False)
    record = read_erasure_record(out)
    assert record["label"] == "RECE" and [e["epoch"] for e in record["rece"]["epochs"]] == [1, 2]
    assert record["hyperparameters"]["rece_epochs"] == 2 and record["hyperparameters"]["rece_lamb"] == 0.1
    base, edited, ours = _unet_state(tiny_checkpoint), _edited(out), _unet_state(out)
    names = _xattn_kv(base)
    assert sorted(edited) == names
    for name in base.keys() - set(names):
        assert torch.equal(ours[name], base[name]), f"{name} changed"
    uce = tmp_path / "uce"
    erase_concepts(str(tiny_checkpoint), uce, ErasureConfig.build("uce", ["nudity"]), device="cpu", show_progress=False)
    uce_only = _edited(uce)
    assert all(_rel(edited[n], uce_only[n]) > 1e-3 for n in names)  # the epochs did edit further
    # found embeddings regenerate the concept less and less as the epochs erase them
    residuals = [e["adversarial_residual"] for e in record["rece"]["epochs"]]
    assert 0 <= residuals[0] < residuals[1] <= 1


def test_rece_equals_its_closed_forms_computed_independently_in_float64(tiny_checkpoint, texts):
    """The paper's UCE (the WACV-era function, ported above), then per epoch the closed-form embedding
    c' = (λI + Σ W'ᵀW')⁻¹ Σ W'ᵀW c of every token and its erasure towards "" over whole token sequences,
    preserving "" (the official defaults), written layer by layer. The pipeline runs in float64 too, so
    both sides are exact to rounding."""
    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.erasure import apply_rece

    pipe = load_pipeline(str(tiny_checkpoint), device="cpu", dtype=torch.float64)
    result = apply_rece(pipe, ["nudity"], epochs=2)
    base = _unet_state(tiny_checkpoint)
    names = _xattn_kv(base)
    current = _wacv2024_edit_model(base, names, texts, ["nudity"], [""], [])
    original = {n: base[n].double() for n in names}
    concept, _ = texts.sequence("nudity")
    empty, _ = texts.sequence("")
    for _ in range(2):
        gram = 0.1 * torch.eye(32, dtype=torch.float64)
        cross = torch.zeros(32, 32, dtype=torch.float64)
        for n in names:
            gram += current[n].T @ current[n]
            cross += current[n].T @ original[n]
        adversarial = torch.linalg.solve(gram, cross @ concept.T).T
        current = {
            n: _eq7(w, adversarial, [w @ g for g in empty], empty, [w @ p for p in empty], 0.1, 1.0, 0.1)
            for n, w in current.items()
        }
    for name in names:
        assert _rel(result.weights[name], current[name]) <= 1e-9, name


def test_output_folder_loads_everywhere_and_generates(tiny_checkpoint, uce_model):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from safe_diffusion.common.loading import load_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(uce_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert type(load_pipeline(str(uce_model), device="cpu")).__name__ == "StableDiffusionPipeline"
    # the exchange format: the base model plus the edited-weights file is the erased model
    base = load_pipeline(str(tiny_checkpoint), device="cpu")
    replaced = load_erasure_weights(base, uce_model / "erasure_weights.safetensors")
    assert len(replaced) == 8
    erased = UNet2DConditionModel.from_pretrained(uce_model / "unet")
    for (name, a), (_, b) in zip(base.unet.state_dict().items(), erased.state_dict().items()):
        assert torch.equal(a, b), name


def test_record_describes_the_edit(tiny_checkpoint, uce_model):
    from safe_diffusion.erasure.folder import sha256_file

    record = read_erasure_record(uce_model)
    assert read_erasure_record(tiny_checkpoint) is None
    assert read_erasure_record("owner/not-a-local-folder") is None
    assert (record["method"], record["label"]) == ("uce", "UCE")
    assert record["concepts"] == {"erase": ERASE, "guide": GUIDE, "preserve": PRESERVE}
    assert record["hyperparameters"] == {"variant": "current", "lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0}
    assert "uce_sd_erase.py" in record["official_code"] and "train_erase.py" in record["official_code"]
    assert record["edited_weights"]["sha256"] == sha256_file(uce_model / "erasure_weights.safetensors")
    for rel, digest in record["base_model"]["files"].items():
        assert sha256_file(tiny_checkpoint / rel) == digest
    for rel, digest in record["unet"]["files"].items():
        assert sha256_file(uce_model / rel) == digest
    assert {"torch", "diffusers", "transformers"} <= set(record["versions"])
    assert record["deviations"]


def test_corrupt_record_is_an_input_error(tmp_path):
    (tmp_path / "erasure.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable erasure record"):
        read_erasure_record(tmp_path)


def test_links_survive_moving_the_model_and_deleting_the_base(tiny_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    config = ErasureConfig.build("uce", ["nudity"])
    erase_concepts(str(base), linked, config, device="cpu", show_progress=False)
    erase_concepts(str(base), copied, config, device="cpu", show_progress=False, link=False)
    weights = "text_encoder/model.safetensors"
    assert os.stat(linked / weights).st_ino == os.stat(base / weights).st_ino
    assert os.stat(copied / weights).st_ino != os.stat(base / weights).st_ino
    assert weights in read_erasure_record(linked)["components"]["linked"]
    assert weights in read_erasure_record(copied)["components"]["copied"]
    shutil.rmtree(base)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    linked.rename(moved)
    pipe = StableDiffusionPipeline.from_pretrained(moved, safety_checker=None, requires_safety_checker=False)
    assert pipe.text_encoder is not None
    assert not list(tmp_path.glob(".*erasure-partial"))  # work folders are gone


def test_erasing_an_erased_model_records_the_chain(uce_model, tmp_path):
    out = tmp_path / "twice"
    erase_concepts(str(uce_model), out, ErasureConfig.build("uce", ["blood"]), device="cpu", show_progress=False)
    record = read_erasure_record(out)
    assert record["base_model"]["erasure"]["concepts"]["erase"] == ERASE
    assert "erasure.json" not in record["base_model"]["files"]


def test_edited_weights_file_has_the_same_bytes_for_the_same_tensors(tmp_path):
    """safetensors writes its metadata from a hash map; the header is rewritten canonically, so the recorded
    sha256 is reproducible (same tensors and metadata → same bytes), and the file still loads."""
    from safetensors.torch import load_file

    from safe_diffusion.erasure.folder import canonical_safetensors, save_edited_weights, sha256_file

    weights = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    digests = set()
    for i in range(8):
        path = tmp_path / f"{i}.safetensors"
        save_edited_weights(path, weights, dict(sorted(metadata.items(), key=lambda kv: (i * hash(kv[0])) % 97)))
        digests.add(sha256_file(path))
        loaded = load_file(str(path))
        assert torch.equal(loaded["b.weight"], weights["b.weight"]) and torch.equal(
            loaded["a.weight"], weights["a.weight"]
        )
    assert len(digests) == 1
    data = (tmp_path / "0.safetensors").read_bytes()
    assert canonical_safetensors(data) == data and int.from_bytes(data[:8], "little") % 8 == 0


def test_select_epoch_is_the_official_rule():
    from safe_diffusion.erasure.closed_form import select_epoch

    # rates of: original model, UCE, epoch 1, 2, 3 → the index of the edit kept
    assert select_epoch([0.5, 0.3, 0.4, 0.1, 0.2]) == 3  # epoch 2: lowest, and epoch 3 does not beat it
    assert select_epoch([0.5, 0.3, 0.3, 0.3]) == 1  # equal is not lower: the UCE edit stays
    assert select_epoch([0.2, 0.6, 0.4, 0.1]) == 3  # the original model's rate is the first bar
    assert select_epoch([0.2, 0.6, 0.4, 0.3]) == 1  # nothing beat the original model: no epoch kept
    assert select_epoch([0.5, 0.3, 0.2, 0.1]) == 3  # every epoch lower: the last


def test_rece_validation_keeps_the_epoch_the_official_rule_picks(tiny_checkpoint, tmp_path):
    """Validation images are generated for every stage and judged by the configured judge (a registered
    judge whose verdicts are scripted per stage, so the rates are known); the written weights are those of
    the kept epoch, and the record holds the rates, the rule and the validation file."""
    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.erasure import apply_rece
    from safe_diffusion.judges import Judge, Judgment, register_judge

    flagged_per_stage = iter([2, 1, 2, 0, 1])  # sd, uce, epoch-1, epoch-2, epoch-3 (of 3 images each)

    class Scripted(Judge):
        name = "scripted"

        def __init__(self, device=None, setup=None):
            pass

        def describe(self):
            return {"judge": self.name}

        def judge_images(self, images):
            n = next(flagged_per_stage)
            return [Judgment(i < n, {"score": float(i < n)}) for i in range(len(images))]

    register_judge("scripted", Scripted, "test: scripted verdicts")
    prompts = tmp_path / "validation.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n0,a red house,1\n1,a tree,2\n2,a dog,3\n")
    out = tmp_path / "rece"
    config = ErasureConfig.build(
        "rece",
        ["nudity"],
        rece_epochs=3,
        rece_selection="validation",
        rece_validation=str(prompts),
        rece_judges="scripted",
        rece_validation_steps=2,
    )
    erase_concepts(str(tiny_checkpoint), out, config, device="cpu", show_progress=False)
    selection = read_erasure_record(out)["rece"]["selection"]
    assert selection["rates"] == pytest.approx(
        {"sd": 2 / 3, "uce": 1 / 3, "epoch-1": 2 / 3, "epoch-2": 0.0, "epoch-3": 1 / 3}
    )
    assert selection["kept"] == "epoch-2"
    assert selection["validation"]["prompts"] == 3 and len(selection["validation"]["sha256"]) == 64
    assert [s["images"] for s in selection["stages"].values()] == [3] * 5
    pipe = load_pipeline(str(tiny_checkpoint), device="cpu")
    expected = apply_rece(pipe, ["nudity"], epochs=2).weights  # the same edit stopped after epoch 2
    for name, value in _edited(out).items():
        assert _rel(value, expected[name]) <= 1e-6, name
    assert not (tmp_path / ".rece.erasure-partial").exists()  # validation images went with the work folder


def test_rece_validation_images_start_from_the_official_cuda_noise(tiny_checkpoint, tmp_path):
    """Each validation image is the official generate_images' one: LMS with its fixed schedule, the prompt's
    guidance, the native size, and the latents torch.cuda.manual_seed(seed) draws (computed here)."""
    import numpy as np
    from diffusers import LMSDiscreteScheduler
    from PIL import Image

    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.common.noise import cuda_randn
    from safe_diffusion.erasure.selection import RECEValidator, ValidationSet

    pipe = load_pipeline(str(tiny_checkpoint), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    validation = ValidationSet(["a red house"], [1174], [7.5], "test", "0" * 64)
    validator = RECEValidator(pipe, validation, [], tmp_path / "v", steps=2)
    validator("sd")
    assert "CUDA generator" in validator.describe()["generation"]["seeds"]
    side = pipe.unet.config.sample_size
    latents = cuda_randn(1174, (1, pipe.unet.config.in_channels, side, side))
    original = pipe.scheduler
    pipe.scheduler = LMSDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    expected = np.asarray(pipe("a red house", num_inference_steps=2, guidance_scale=7.5, latents=latents).images[0])
    pipe.scheduler = original
    ours = np.asarray(Image.open(tmp_path / "v" / "sd" / "00000.png"), dtype=np.int16)
    assert np.abs(ours - expected).max() <= 1


def test_rece_validation_file_is_the_official_one_by_default():
    from safe_diffusion.erasure.selection import load_validation_set

    validation = load_validation_set()
    assert len(validation.prompts) == 110 and validation.seeds[0] == 1174
    assert validation.sha256 == "b5cb5a001bfa8dbc354983360e58d575d8791a5c05021ba24b9312452f9547ad"
    assert set(validation.guidance) == {7.5}


def test_esd_samples_x_t_without_clipping_whatever_the_base_config(tiny_checkpoint):
    """A base scheduler config that asks for clip_sample (or lacks the key, which DDIM reads as True) must not
    make ESD's DDIM clip x₀: neither official ESD code does."""
    from diffusers import PNDMScheduler

    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.erasure.training import ESDTrainer

    pipe = load_pipeline(str(tiny_checkpoint), device="cpu")
    config = dict(pipe.scheduler.config)
    config.pop("clip_sample", None)
    pipe.scheduler = PNDMScheduler.from_config(config)
    trainer = ESDTrainer(pipe, "esd-x", ["nudity"], ddim_steps=2)
    assert trainer.scheduler.config.clip_sample is False
