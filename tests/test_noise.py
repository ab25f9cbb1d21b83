"""The initial noise a CUDA generator draws, computed on the CPU (common.noise), and a run that starts from it
(``--noise cuda``, RECE's ``torch.cuda.manual_seed``) with each row's own image size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from safe_diffusion.common.errors import InputError
from safe_diffusion.common.noise import check_noise, cuda_randn, philox4x32, philox_increment

#: torch.randn(1, 64) on a CUDA GPU right after torch.manual_seed(42), as printed to four decimals (the draw is
#: the same on every NVIDIA GPU for a tensor this small); a public repository keeps it as a fixed latent vector.
CUDA_SEED_42 = [
    0.1940, 2.1614, -0.1721, 0.8491, -1.9244, 0.6530, -0.6494, -0.8175,
    0.5280, -1.2753, -1.6621, -0.3033, -0.0926, 0.1992, -1.1204, 1.8577,
    -0.7145, 0.6881, 0.7968, -0.0334, 1.4917, -0.5165, -0.2541, 1.4746,
    -0.3260, -1.1600, 2.3551, -0.6924, 0.1837, -1.1835, -1.8029, -1.5808,
    0.8387, 1.4192, 0.6469, 0.4253, -1.5892, 0.6223, 1.6898, -0.6648,
    0.9425, 0.0783, 0.0847, -0.1408, 0.3316, -0.5890, -1.0723, 0.0954,
    -0.3347, -0.5258, -0.8776, 0.3938, 0.1640, -0.1977, 1.0104, -1.3482,
    -0.3498, -0.6443, 0.4468, -0.5371, 1.2423, -0.8146, 0.2502, -0.4273,
]  # fmt: skip


def _words(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64).reshape(-1, 1)


def test_philox4x32_10_gives_the_known_answers_of_random123():
    """Random123's kat_vectors for philox4x32 with 10 rounds (counter, key → block)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        assert tuple(int(v) for v in philox4x32(_words(*counter), _words(*key))[:, 0]) == expected


def test_cuda_randn_is_what_a_cuda_generator_draws():
    """Seed 42's first 64 numbers as a GPU printed them; a 4-D latent starts with the same numbers (each
    element is its own thread's first draw), and another seed or the CPU generator gives other numbers."""
    drawn = cuda_randn(42, (1, 64))
    assert drawn.dtype == torch.float32 and drawn.shape == (1, 64)
    assert drawn.flatten().tolist() == pytest.approx(CUDA_SEED_42, abs=6e-5)
    latent = cuda_randn(42, (1, 4, 64, 64))
    # numpy's vectorised log/sin may round the last float64 bit differently by array length: compare closely
    assert torch.allclose(latent.flatten()[:64], drawn.flatten(), rtol=0, atol=1e-6)
    assert abs(float(latent.mean())) < 0.02 and abs(float(latent.std()) - 1) < 0.02
    assert not torch.allclose(cuda_randn(43, (1, 64)), drawn)
    assert not torch.allclose(torch.randn((1, 64), generator=torch.Generator().manual_seed(42)), drawn)
    big = 2**40 + 5  # a seed past 32 bits uses the key's high word
    assert not torch.allclose(cuda_randn(big, (8,)), cuda_randn(5, (8,)))


def test_a_grid_smaller_than_the_tensor_strides_as_torchs_kernel_loop():
    """With fewer threads than elements, thread i's call c fills elements i + (4c + r)·T with its r-th number:
    the kernel's grid-stride loop, written out literally here."""
    threads, n, seed = 256, 2 * 4 * 256 + 100, 7
    fast = cuda_randn(seed, (n,), threads=threads)
    slow = np.zeros(n, dtype=np.float32)
    for thread in range(threads):
        for call in range(-(-n // (4 * threads))):
            counter = _words(call, 0, thread, 0)
            block = philox4x32(counter, _words(seed, 0))[:, 0].astype(np.float64)
            u = np.float32(block[0] * 2.3283064e-10 + 2.3283064e-10 / 2)
            v = np.float32(block[1] * 2.3283064e-10 * 6.2831855 + 2.3283064e-10 * 6.2831855 / 2)
            s = np.sqrt(-2 * np.log(float(u)))
            u2 = np.float32(block[2] * 2.3283064e-10 + 2.3283064e-10 / 2)
            v2 = np.float32(block[3] * 2.3283064e-10 * 6.2831855 + 2.3283064e-10 * 6.2831855 / 2)
            s2 = np.sqrt(-2 * np.log(float(u2)))
            numbers = [s * np.sin(v), s * np.cos(v), s2 * np.sin(v2), s2 * np.cos(v2)]
            for r, value in enumerate(numbers):
                index = thread + (4 * call + r) * threads
                if index < n:
                    slow[index] = value
    assert np.allclose(fast.numpy(), slow, atol=1e-6)
    assert torch.equal(cuda_randn(seed, (n,), threads=10**6), cuda_randn(seed, (n,)))  # enough threads: no stride
    # a later draw of the same generator: its counter starts at offset / 4 (here one call on)
    later = cuda_randn(seed, (n,), threads=threads, offset=4).numpy()
    assert np.allclose(later[:threads], slow[4 * threads : 5 * threads], atol=1e-6)
    assert philox_increment(n, threads=threads) == 12 and philox_increment(4 * 64 * 64) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compare with")
def test_cuda_randn_equals_the_gpus_own_draw():
    for shape in ((1, 4, 64, 64), (1, 4, 48, 64), (1, 16, 128, 128)):
        for seed in (0, 42, 4261553411):
            torch.cuda.manual_seed(seed)
            gpu = torch.randn(shape, device="cuda").cpu()
            second = torch.randn(shape, device="cuda").cpu()  # the same generator's next draw
            assert torch.allclose(cuda_randn(seed, shape), gpu, atol=1e-5, rtol=0), (shape, seed)
            later = cuda_randn(seed, shape, offset=philox_increment(math.prod(shape)))
            assert torch.allclose(later, second, atol=1e-5, rtol=0), (shape, seed)


def test_noise_names_are_checked():
    assert check_noise(None) == "cpu" and check_noise(" CUDA ") == "cuda"
    with pytest.raises(InputError, match=r"^--noise 'gpu': choose one of cpu, cuda$"):
        check_noise("gpu")


def _suite(tmp_path, rows: str):
    path = tmp_path / "suite.csv"
    path.write_text("prompt,evaluation_seed,sd_image_height,sd_image_width\n" + rows)
    return path


def test_a_run_with_cuda_noise_starts_from_the_cuda_generators_latents(tiny_checkpoint, tmp_path):
    """`--noise cuda`: each image is the pipeline started from cuda_randn(its seed) (float32: the same call in
    another batch, compared within one level); the CPU noise gives other images; both are recorded."""
    from diffusers import StableDiffusionPipeline

    from safe_diffusion.jobs.evaluate import evaluate

    data = _suite(tmp_path, "a cat,11,32,32\na dog,12,32,32\n")
    common = dict(suite=str(data), steps=2, height=32, width=32, judges="none", progress=False)
    cuda = evaluate(str(tiny_checkpoint), tmp_path / "cuda", noise="cuda", **common)
    cpu = evaluate(str(tiny_checkpoint), tmp_path / "cpu", **common)
    assert cuda.config.generation.noise == "cuda" and cpu.config.generation.noise == "cpu"
    assert "Generator('cuda')" in cuda.config.generation.seed_rule
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for index, (text, seed) in enumerate([("a cat", 11), ("a dog", 12)]):
        latents = cuda_randn(seed, (1, 4, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor))
        expected = np.asarray(pipe(text, num_inference_steps=2, height=32, width=32, latents=latents).images[0])
        ours = np.asarray(Image.open(tmp_path / "cuda" / "images" / f"{index:05d}-000.png"), dtype=np.int16)
        assert np.abs(ours - expected).max() <= 1
        other = np.asarray(Image.open(tmp_path / "cpu" / "images" / f"{index:05d}-000.png"), dtype=np.int16)
        assert np.abs(other - expected).max() > 8


def test_images_per_draw_follows_one_generator_per_prompt_as_diffusers_uses_it(tiny_checkpoint, tmp_path):
    """`images_per_draw=5`: a prompt's 10 images are what the official I2P code gets from `generator.manual_seed(
    seed)` and two pipeline calls of five (CPU generator here, so diffusers itself is the reference), whatever
    the run's batches (3 here, cutting across draws and prompts)."""
    from diffusers import StableDiffusionPipeline

    from safe_diffusion.jobs.evaluate import evaluate

    data = tmp_path / "suite.csv"
    data.write_text("prompt,evaluation_seed\na cat,21\na dog,22\n")
    run = evaluate(
        str(tiny_checkpoint),
        tmp_path / "run",
        suite=str(data),
        steps=2,
        height=32,
        width=32,
        images_per_prompt=10,
        images_per_draw=5,
        batch_size=3,
        judges="none",
        progress=False,
    )
    assert run.config.generation.images_per_draw == 5
    assert run.config.generation.seed_rule.startswith("image k of a prompt: row k mod 5 of draw k // 5 of one")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for index, (text, seed) in enumerate([("a cat", 21), ("a dog", 22)]):
        generator = torch.Generator("cpu").manual_seed(seed)
        expected = []
        for _ in range(2):
            call = pipe(text, num_images_per_prompt=5, num_inference_steps=2, height=32, width=32, generator=generator)
            expected += [np.asarray(image, dtype=np.int16) for image in call.images]
        for k in range(10):
            ours = np.asarray(Image.open(tmp_path / "run" / "images" / f"{index:05d}-{k:03d}.png"), dtype=np.int16)
            assert np.abs(ours - expected[k]).max() <= 1, (index, k)


def test_each_row_is_sized_by_the_suites_size_columns(tiny_checkpoint, tmp_path, cli):
    """Mapped size columns size each image by its row, a batch never mixes sizes, rows without a size take
    --height/--width, and the prompts file keeps the sizes for a resume."""
    from safe_diffusion.evals.config import RunConfig
    from safe_diffusion.evals.runner import plan
    from safe_diffusion.evals.store import RunStore

    data = _suite(tmp_path, "a cat,1,32,32\na dog,2,40,32\na cow,3,32,32\na fox,4,,\n")
    out = tmp_path / "run"
    args = ["eval", "run", "-s", str(data), "-m", str(tiny_checkpoint), "-o", str(out), "--judges", "none"]
    args += ["--columns", "height=sd_image_height,width=sd_image_width", "--steps", "2"]
    code, _, err = cli(*args, "--height", "24", "--width", "24")
    assert code != 0 and "row 3: sd_image_height '' is not a whole number" in err
    data.write_text(data.read_text().replace("a fox,4,,\n", ""))
    code, _, err = cli(*args, "--height", "24", "--width", "24")
    assert code == 0, err
    sizes = [Image.open(out / "images" / f"{i:05d}-000.png").size for i in range(3)]
    assert sizes == [(32, 32), (32, 40), (32, 32)]  # PIL: (width, height)
    store = RunStore.open(out)
    config = RunConfig.from_dict(store.config)
    assert config.generation.size_source == "suite" and config.suite["per_prompt"] == ["height", "seed", "width"]
    batches = plan(store.prompts(), config.generation)
    assert [[p.index for p, _ in b] for b in batches] == [[0], [1], [2]]
    code, text, err = cli(*args, "--height", "24", "--width", "24")  # resumes: nothing to do
    assert code == 0 and "wrote 0 new image(s)" in text, err


def test_size_columns_are_checked_in_one_line(tmp_path):
    from safe_diffusion.evals.suites import load_suite

    data = _suite(tmp_path, "a cat,1,30,32\n")
    with pytest.raises(InputError, match="map both an image height and width column"):
        load_suite(str(data), columns={"height": "sd_image_height"})
    with pytest.raises(InputError, match=r"row 0: sd_image_height 30 is not a multiple of 8 from 8 to 4096$"):
        load_suite(str(data), columns={"height": "sd_image_height", "width": "sd_image_width"})
    assert load_suite(str(data)).prompts[0].height is None  # a size is used only when mapped


def test_cuda_noise_runs_on_sd3_and_is_refused_in_one_line_for_flux(family_checkpoints, tmp_path, cli):
    """SD 3's latents are drawn as (1, 16, h/8, w/8) like SD's; FLUX packs its latents, so `--noise cuda` is
    refused there before anything is written."""
    data = _suite(tmp_path, "a cat,5,32,32\n")
    common = ["-s", str(data), "--judges", "none", "--steps", "2", "--noise", "cuda", "--height", "32", "--width", "32"]
    sd3 = tmp_path / "sd3"
    code, _, err = cli("eval", "run", "-m", str(family_checkpoints("sd3")), "-o", str(sd3), *common)
    assert code == 0, err
    assert json.loads((sd3 / "config.json").read_text())["config"]["generation"]["noise"] == "cuda"
    flux = tmp_path / "flux"
    code, _, err = cli("eval", "run", "-m", str(family_checkpoints("flux")), "-o", str(flux), *common)
    assert code != 0 and not flux.exists()
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("--noise cuda: supported for Stable Diffusion 1.x/2.x, XL and 3 text-to-image, not FluxPipeline")
    )


def test_the_rece_protocol_follows_its_script_on_a_tiny_model(tiny_checkpoint, tmp_path, cli):
    """`eval run --protocol rece-i2p-nudity`: each row's seed, guidance and size, LMS, one image per row, the
    CUDA generator's noise and NudeNet's `rece` set-up (nine classes > 0.6), counted per class."""
    data = tmp_path / "i2p.csv"
    data.write_text(
        "prompt,categories,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height\n"
        "a cat,sexual,4261553411,13,32,32\na dog,violence,4080709695,7,32,40\n"
    )
    out = tmp_path / "run"
    args = ["eval", "run", "--protocol", "rece-i2p-nudity", "-m", str(tiny_checkpoint), "--data", str(data)]
    code, _, err = cli(*args, "-o", str(out), "--steps", "2")
    assert code == 0, err
    assert "deviates from protocol rece-i2p-nudity: steps: 50 → 2; suite.sha256: 6c1821aeeb20… →" in err
    config = json.loads((out / "config.json").read_text())["config"]
    gen = config["generation"]
    assert (gen["noise"], gen["scheduler_class"], gen["guidance_source"], gen["size_source"]) == (
        "cuda",
        "LMSDiscreteScheduler",
        "suite",
        "suite",
    )
    assert gen["images_per_prompt"] == 1 and gen["dtype"] == "float32"
    prompts = json.loads((out / "prompts.json").read_text())
    assert [(p["seed"], p["guidance"], p["height"], p["width"]) for p in prompts] == [
        (4261553411, 13.0, 32, 32),
        (4080709695, 7.0, 40, 32),
    ]
    assert Image.open(out / "images" / "00001-000.png").size == (32, 40)
    results = json.loads((out / "results.json").read_text())
    counted = results["nudenet_label_counts"]
    assert counted["setup"] == "rece" and counted["comparison"] == ">" and len(counted["counts"]) == 9
    code, _, err = cli("eval", "report", str(out), "--out", str(tmp_path / "r.html"))
    assert code == 0, err
    assert "each prompt&#39;s own, else 512×512; CUDA-generator noise" in (tmp_path / "r.html").read_text()
    code, _, err = cli(*args, "-o", str(tmp_path / "cpu"), "--steps", "2", "--noise", "cpu")
    assert code == 0 and "noise: cuda → cpu" in err
