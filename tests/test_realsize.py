"""Real-size random-weight models (safe_diffusion.testing.realsize) and the real-size benchmark, run shrunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safe_diffusion.testing.realsize import REAL_SIZES, build_real_pipeline, count_parameters

ROOT = Path(__file__).resolve().parents[1]

#: Parameter counts of the published checkpoints (each component's safetensors), exact.
PUBLISHED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,  # CLIP ViT-L/14's text tower
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG/14's text tower with its projection
    ("flux-dev", "transformer"): 11_901_408_320,
    ("flux-dev", "text_encoder_2"): 4_762_310_656,  # T5 v1.1 XXL's encoder
}
#: Sizes the model cards give in round figures: (billions of parameters, relative tolerance).
ROUNDED = {
    ("sd35-medium", "transformer"): (2.5, 0.12),  # "2.5B" on the card counts more than the MMDiT-X blocks
    ("pixart-sigma", "transformer"): (0.6, 0.05),
    ("wan2.1-1.3b", "transformer"): (1.3, 0.1),
    ("wan2.1-1.3b", "text_encoder"): (5.7, 0.02),  # UMT5-XXL's encoder
}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux-dev", "sd35-medium", "pixart-sigma", "wan2.1-1.3b"])
def test_real_sizes_have_the_published_parameter_counts(family):
    pipe = build_real_pipeline(family, device="meta")  # structure only: no memory
    counts = {n: count_parameters(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert type(pipe).__name__ == REAL_SIZES[family].pipeline
    for (fam, component), expected in PUBLISHED.items():
        if fam == family:
            assert counts[component] == expected, component
    for (fam, component), (billions, tol) in ROUNDED.items():
        if fam == family:
            assert abs(counts[component] / 1e9 - billions) <= tol * billions, (component, counts[component])


def test_flux_dev_without_guidance_embeddings_drops_only_the_guidance_embedder():
    dev = build_real_pipeline("flux-dev", device="meta").transformer
    plain = build_real_pipeline("flux-dev-no-guidance-embeds", device="meta").transformer
    assert dev.config.guidance_embeds and not plain.config.guidance_embeds
    extra = {n for n, _ in dev.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra and all("guidance_embedder" in n for n in extra)


def test_materialised_weights_are_finite_scaled_tied_and_keep_float32_where_loading_would():
    pipe = build_real_pipeline("wan2.1-1.3b", tiny=True, dtype=torch.bfloat16, seed=3)
    assert not any(p.is_meta for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters())
    t5 = pipe.text_encoder
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied, as transformers ties them
    transformer = pipe.transformer
    # diffusers keeps WanTransformer3DModel's _keep_in_fp32_modules in float32 whatever the dtype
    assert transformer.scale_shift_table.dtype == torch.float32
    assert transformer.blocks[0].norm2.weight.dtype == torch.float32
    assert transformer.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16  # kept only in fp16
    w = transformer.blocks[0].attn1.to_q.weight.float()
    assert torch.isfinite(w).all() and abs(w.var().item() * w.shape[1] - 1.0) < 0.2  # variance 1/fan-in
    assert (transformer.blocks[0].attn1.to_q.bias == 0).all()
    again = build_real_pipeline("wan2.1-1.3b", tiny=True, dtype=torch.bfloat16, seed=3).transformer
    assert torch.equal(again.blocks[0].attn1.to_q.weight, transformer.blocks[0].attn1.to_q.weight)


def test_a_tiny_real_size_pipeline_runs_guided_and_stays_finite():
    from safe_diffusion import SafetyGuidance, guide

    pipe = build_real_pipeline("sd15", tiny=True)
    pipe.set_progress_bar_config(disable=True)
    with guide(pipe, SafetyGuidance.from_preset("max")):
        out = pipe("a photo", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                   **REAL_SIZES["sd15"].native_call(tiny=True)).images
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_saving_is_only_on_request(tmp_path):
    build_real_pipeline("sd15", tiny=True, path=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model_index.json").is_file()
    with pytest.raises(ValueError, match="unknown family"):
        build_real_pipeline("sd2")


def _plan(*args):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import realsize

        return realsize.make_plan(realsize.parse_args(["--json", "x.json", *args]))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_the_cpu_plan_is_the_reduced_set():
    cpu = _plan("--device", "cpu")
    assert cpu.quick and cpu.families == ["sd15"] and cpu.family_settings("sd15")[:2] == (2, 1)
    assert {"esd", "i2p_end_to_end", "llavaguard", "ledits"} <= set(cpu.skip) and cpu.budget_s == 600
    gpu = _plan("--device", "cuda")
    assert not gpu.quick and set(gpu.families) == set(REAL_SIZES) and not gpu.skip and gpu.budget_s <= 420
    assert gpu.eval_steps == 50  # the I2P protocol's steps


def test_the_benchmark_runs_shrunk_and_writes_every_figure(tmp_path):
    out = tmp_path / "tiny.json"
    families = "sd15,sdxl,flux-dev,wan2.1-1.3b"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "benchmarks" / "realsize.py")
    proc = subprocess.run(
        [sys.executable, script, "--tiny", "--families", families, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["schema"] == "safe-diffusion.realsize/1" and meta["plan"]["tiny"] is True
    for key in ("device", "torch", "diffusers", "transformers", "commit", "load_average_start", "wall_s"):
        assert key in meta
    assert set(result) == {"meta", *families.split(",")}
    for family in families.split(","):
        r = result[family]
        assert r["cfg_s_per_image"] > 0 and r["steps"] == 2 and r["batch"] == 1
        assert set(r["sld_over_cfg"]) == {"weak", "medium", "strong", "max"}
        assert set(r["sega_over_cfg"]) == {"1", "2", "3"}
        assert isinstance(r["no_term_overhead"], float) and isinstance(r["negative_prompt_over_cfg"], float)
        # floors are counted rows: weak SLD is within its warm-up at 2 steps (no rows), the others add one block
        assert r["sld_floor"] == {"weak": 1.0, "medium": 1.5, "strong": 1.5, "max": 1.5}
        assert r["sega_floor"] == {"1": 1.5, "2": 2.0, "3": 2.5}
        assert set(r["peak_memory_bytes"]) == set(r["s_per_image"]) and r["peak_memory_bytes"]["cfg"] > 0
        assert r["decode_s_per_image"] >= 0
    sections = result["sd15"]["sections"]
    assert set(sections) == {"uce_rece", "judges", "i2p_end_to_end", "esd", "llavaguard", "ledits"}
    assert set(sections["uce_rece"]["uce_s"]) == set(sections["uce_rece"]["rece_s"]) == {"1", "10", "100"}
    assert set(sections["judges"]["images_per_s"]) == {"q16", "nudenet", "clip_score", "fid_features"}
    assert sections["i2p_end_to_end"]["naive_end_to_end_images_per_s"] > 0
    assert sections["esd"]["steps_per_s"] > 0 and sections["ledits"]["s_per_image"] > 0
    assert sections["llavaguard"]["images_per_s"] > 0
    assert result["sdxl"]["sections"]["modular_guiders"]["modular_sld_over_cfg_guider"] > 0
    table = out.with_suffix(".md").read_text()
    assert all(f"| {f} |" in table for f in families.split(",")) and "SLD/CFG" in table


class _HostToDevice:
    """Records blocking host-to-device copies of non-scalar tensors dispatched while active."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        found = self.found = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                if (any(t.device.type == "cpu" and t.dim() > 0 for t in ins)
                        and any(t.device.type != "cpu" for t in outs) and not kwargs.get("non_blocking")):
                    found.append(str(func))
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_guidance_math_makes_no_blocking_host_to_device_copy_per_step():
    """On a GPU a blocking copy from the host waits for the denoiser's queued work at every step; the math
    runs here on the meta device, where every such copy still shows as a dispatched op."""
    from safe_diffusion import FairGuidance, SafetyGuidance, SemanticGuidance

    u, t = torch.randn(2, 4, 8, 8, device="meta"), torch.randn(2, 4, 8, 8, device="meta")
    concepts = [torch.randn(2, 4, 8, 8, device="meta") for _ in range(2)]
    terms = [
        SafetyGuidance.from_preset("max"),
        SemanticGuidance(["a", "b"], warmup_steps=[0, 5], reverse=[False, True]),
        FairGuidance(["a", "b"], warmup_steps=0).for_seeds([0, 1]),
    ]
    for term in terms:
        state = term.initial_state()
        for step in range(2):
            with _HostToDevice() as copies:
                _, state = term.apply(u, t, concepts[: len(term.concepts)], step, state, 7.5)
            assert not copies.found, (type(term).__name__, copies.found)
