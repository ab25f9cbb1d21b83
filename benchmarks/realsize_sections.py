"""The sections of benchmarks/realsize.py beyond the guidance comparison: erasure, the evaluation stages,
LEDITS++ and the modular SDXL guiders. Each method returns one JSON-ready dict; see realsize.py's docstring.

Every model is a random-weight one at the real size (tiny with ``--tiny``); images are noise, written to a
temporary folder that is removed at the end. I2P prompts (inappropriate by design) are never printed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: (section, the family it belongs to), in the order they run (cheapest and most asked-for first).
SECTIONS = [
    ("uce_rece", "sd15"),
    ("judges", "sd15"),
    ("i2p_end_to_end", "sd15"),
    ("esd", "sd15"),
    ("llavaguard", "sd15"),
    ("ledits", "sd15"),
    ("modular_guiders", "sdxl"),
]
WORDS = ["red", "violent", "ancient", "blurry", "famous", "wet", "glowing", "tiny", "angry", "golden"]
NOUNS = ["painter", "weapon", "castle", "crowd", "dog", "statue", "car", "forest", "singer", "mask"]


def concepts(n: int) -> list[str]:
    """n distinct concepts with distinct final words, like a list of artists or objects."""
    return [f"{WORDS[i % 10]} {NOUNS[i // 10 % 10]} {i}" for i in range(n)]


def _images(folder: Path, n: int, side: int) -> list[Path]:
    """n smooth-noise PNGs (they compress like photographs, not like white noise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


class Sections:
    def __init__(self, plan, budget, build, measure, free, prompt: str):
        self.plan, self.budget, self._build, self._measure, self._free = plan, budget, build, measure, free
        self.prompt = prompt
        self.device = plan.device
        self.tmp = Path(tempfile.mkdtemp(prefix="realsize-"))
        self._pipes: dict = {}
        self._clip: Path | None = None

    def close(self) -> None:
        self._pipes.clear()
        self._free()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- shared pieces ------------------------------------------------------------------------------
    def pipeline(self, family: str, dtype: torch.dtype):
        """One pipeline per (family, dtype), kept while the next section needs it (the others are freed)."""
        key = (family, dtype)
        if key not in self._pipes:
            self._pipes.clear()
            self._free()
            self._pipes[key] = self._build(family, self.plan, dtype)
        return self._pipes[key]

    def gpu_dtype(self, family: str) -> torch.dtype:
        from safe_diffusion.testing.realsize import REAL_SIZES

        if torch.device(self.device).type == "cuda":
            return getattr(torch, REAL_SIZES[family].gpu_dtype)
        return torch.float32

    def measure(self, fn):
        return self._measure(fn, self.device)

    def clip_folder(self) -> Path:
        """CLIP ViT-L/14's architecture (random weights) saved once, for Q16 and the CLIP score."""
        if self._clip is None:
            from safe_diffusion.testing import build_clip

            self._clip = build_clip(self.tmp / "clip", size="tiny" if self.plan.tiny else "vit-l14")
        return self._clip

    def judge_images(self) -> list[Path]:
        folder = self.tmp / "judge-images"
        if not folder.is_dir():
            _images(folder, self.plan.judge_images, 64 if self.plan.tiny else 512)
        return sorted(folder.glob("*.png"))

    # -- sections ---------------------------------------------------------------------------------------
    def uce_rece(self) -> dict:
        """UCE and RECE (3 epochs): one batched solve for 1, 10, 100 concepts on SD 1.5 in float32."""
        from safe_diffusion.erasure import apply_rece, apply_uce

        pipe = self.pipeline("sd15", torch.float32)
        params = dict(pipe.unet.named_parameters())
        saved = {n: p.detach().clone() for n, p in params.items() if ".attn2.to_k." in n or ".attn2.to_v." in n}

        def restore():
            for n, w in saved.items():
                params[n].data = w.clone()

        preserve = ["a photo", "a landscape"]
        apply_uce(pipe, concepts(1), preserve=preserve)  # warm-up
        restore()
        out = {
            "dtype": "float32",
            "preserved_texts": len(preserve),
            "rece_epochs": 3,
            "uce_s": {},
            "rece_s": {},
            "peak_memory_bytes": {},
        }
        for n in (1, 10, 100):
            seconds, peak = self.measure(lambda n=n: apply_uce(pipe, concepts(n), preserve=preserve))
            restore()
            out["uce_s"][str(n)] = seconds
            out["peak_memory_bytes"][f"uce_{n}"] = peak
            seconds, peak = self.measure(lambda n=n: apply_rece(pipe, concepts(n), preserve=preserve, epochs=3))
            restore()
            out["rece_s"][str(n)] = seconds
            out["peak_memory_bytes"][f"rece_{n}"] = peak
        out["anchor"] = "SPEED (Li et al. 2025) reports 100 concepts in about 5 s on one GPU"
        return out

    def esd(self) -> dict:
        """ESD-x training steps per second (x_t sampled with the paper's 50 DDIM steps) on SD 1.5 in float32."""
        from safe_diffusion.erasure import ESDTrainer

        pipe = self.pipeline("sd15", torch.float32)
        ddim = 4 if self.plan.tiny else 50
        steps = 2 if self.plan.tiny else 5
        trainer = ESDTrainer(pipe, "esd-x", ["nudity"], ddim_steps=ddim, lr=1e-5)
        trainer.train_step(0)  # warm-up

        def train():
            for k in range(1, steps + 1):
                trainer.train_step(k)

        seconds, peak = self.measure(train)
        return {
            "method": "esd-x",
            "dtype": "float32",
            "ddim_steps": ddim,
            "steps_timed": steps,
            "steps_per_s": steps / seconds,
            "peak_memory_bytes": peak,
            "note": "each step samples x_t with a random number (0..ddim_steps-1) of frozen-model DDIM steps",
        }

    def judges(self) -> dict:
        """Images per second of Q16 (CLIP ViT-L/14), NudeNet, the CLIP score and the FID features."""
        from safe_diffusion.common import prefetch
        from safe_diffusion.evals import quality as q
        from safe_diffusion.judges import load_judges
        from safe_diffusion.testing import build_inception_weights

        paths = self.judge_images()
        warm = paths[: max(1, len(paths) // 4)]
        out: dict = {
            "images": len(paths),
            "image_side": 64 if self.plan.tiny else 512,
            "images_per_s": {},
            "decoding_in_line_images_per_s": {},
            "peak_memory_bytes": {},
        }

        def record(name, fn):
            fn(warm)
            saved = prefetch.MAX_WORKERS
            try:  # side by side: files decoded in line, as before the read-ahead (issue 23)
                prefetch.MAX_WORKERS = 1
                in_line, _ = self.measure(lambda: fn(paths))
            finally:
                prefetch.MAX_WORKERS = saved
            seconds, peak = self.measure(lambda: fn(paths))
            out["images_per_s"][name] = len(paths) / seconds
            out["decoding_in_line_images_per_s"][name] = len(paths) / in_line
            out["peak_memory_bytes"][name] = peak

        clip = str(self.clip_folder())
        for judge in load_judges(["q16", "nudenet"], device=self.device, options={"q16": {"model": clip}}):
            record(judge.name, judge.judge)
        items = q.folder_images(paths[0].parent, {p.name: self.prompt for p in paths})  # sorted like `paths`

        def select(ps):
            return items[: len(ps)]

        scorer = q.ClipScorer(clip, device=self.device)
        record("clip_score", lambda ps: q.clip_scores(select(ps), scorer, batch_size=16))
        inception = q.InceptionV3Features(build_inception_weights(self.tmp / "inception.pth"), device=self.device)
        record("fid_features", lambda ps: q.image_features(select(ps), inception, batch_size=16))
        out["models"] = {
            "q16": "CLIP ViT-L/14 architecture" if not self.plan.tiny else "tiny CLIP",
            "nudenet": "the bundled 320n.onnx (real weights)",
            "fid_features": "InceptionV3 (FID)",
        }
        return out

    def llavaguard(self) -> dict:
        """LlavaGuard v1.2 0.5B's architecture: images per second with the official policy, greedy, 200 new tokens."""
        from safe_diffusion.judges import load_judges
        from safe_diffusion.testing import build_llava_onevision

        folder = build_llava_onevision(self.tmp / "llavaguard", size="tiny" if self.plan.tiny else "0.5b")
        dtype = "float32" if self.plan.tiny or torch.device(self.device).type == "cpu" else "bfloat16"
        options = {"model": str(folder), "dtype": dtype, "max_new_tokens": 8 if self.plan.tiny else 200}
        (judge,) = load_judges(["llavaguard"], device=self.device, options={"llavaguard": options})
        paths = self.judge_images()[: 2 if self.plan.tiny else 16]
        judge.judge(paths[:1])
        seconds, peak = self.measure(lambda: judge.judge(paths))
        shutil.rmtree(folder, ignore_errors=True)
        return {
            "images": len(paths),
            "dtype": dtype,
            "batch_size": 8,
            **{k: v for k, v in options.items() if k != "model"},
            "images_per_s": len(paths) / seconds,
            "peak_memory_bytes": peak,
            "deviation": "byte-level tokenizer: the policy is ~4x more prompt tokens than with Qwen2's, "
            "so the prefill is overestimated; random weights never stop early",
        }

    def i2p_end_to_end(self) -> dict:
        """The I2P run (SLD medium at the protocol's settings, then Q16 + NudeNet) vs a naive one-prompt loop."""
        from diffusers import StableDiffusionPipelineSafe

        from safe_diffusion import SafetyConfig
        from safe_diffusion.evals import runner
        from safe_diffusion.evals import suites as data
        from safe_diffusion.evals.config import build_run_config
        from safe_diffusion.evals.store import RunStore
        from safe_diffusion.judges import load_judges

        pipe = self.pipeline("sd15", torch.float32)
        n, steps = self.plan.eval_prompts, self.plan.eval_steps
        side = 64 if self.plan.tiny else 512
        suite = data.load_suite("i2p")
        config, terms = build_run_config(
            suite,
            "runwayml/stable-diffusion-v1-5",
            safety="medium",
            height=side,
            width=side,
            steps=steps,
            images_per_prompt=1,
            batch_size=8,
        )
        options = {"q16": {"model": str(self.clip_folder())}}
        judges = load_judges(["q16", "nudenet"], device=self.device, options=options)

        def ours(folder, limit):
            store = RunStore.create_or_resume(self.tmp / folder, config.to_dict(), suite.prompts, {}, limit=limit)
            t = time.perf_counter()
            runner.generate(pipe, store, config, terms=terms, show_progress=False)
            gen = time.perf_counter() - t
            runner.classify(store, judges, show_progress=False)
            return gen

        ours("warm", 1)
        generation_s = []
        seconds, peak = self.measure(lambda: generation_s.append(ours("run", n)))

        safe = StableDiffusionPipelineSafe(
            **{
                k: v
                for k, v in pipe.components.items()
                if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
            },
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        safe.set_progress_bar_config(disable=True)
        prompts = suite.prompts[:n]
        folder = self.tmp / "naive"
        folder.mkdir()

        def naive(items):
            for i, p in enumerate(items):  # one prompt at a time, one image per call, judged as it comes
                image = safe(
                    p.text,
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    height=side,
                    width=side,
                    generator=torch.Generator().manual_seed(p.sd_seed),
                    **SafetyConfig.MEDIUM,
                ).images[0]
                path = folder / f"{i:05d}.png"
                image.save(path)
                for judge in judges:
                    judge.judge([path])

        naive(prompts[:1])
        naive_s, naive_peak = self.measure(lambda: naive(prompts))
        return {
            "prompts": n,
            "images_per_prompt": 1,
            "steps": steps,
            "size": side,
            "dtype": "float32",
            "safety": "medium",
            "batch_size": 8,
            "judges": ["q16", "nudenet"],
            "generation_images_per_s": n / generation_s[0],
            "end_to_end_images_per_s": n / seconds,
            "naive_end_to_end_images_per_s": n / naive_s,
            "speedup": naive_s / seconds,
            "peak_memory_bytes": {"ours": peak, "naive": naive_peak},
            "naive": "diffusers' StableDiffusionPipelineSafe, one prompt per call, each image saved and judged as it"
            " comes",
        }

    def ledits(self) -> dict:
        """LEDITS++ on SD 1.5: inversion (50 steps, skip 0.15) + a two-concept removal edit, per 512x512 image."""
        from PIL import Image

        from safe_diffusion.editing import LEditsGuidance, edit, invert

        dtype = self.gpu_dtype("sd15")
        pipe = self.pipeline("sd15", dtype)
        side = 64 if self.plan.tiny else 512
        steps = 4 if self.plan.tiny else 50
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        guidance = LEditsGuidance(["nudity", "blood"], reverse=True)

        def once():
            with torch.inference_mode():
                inv = invert(pipe, image, num_inversion_steps=steps, generator=torch.Generator().manual_seed(0))
                edit(pipe, inv, guidance, output_type="pil")

        once()
        seconds, peak = self.measure(once)
        return {
            "dtype": str(dtype).removeprefix("torch."),
            "size": side,
            "inversion_steps": steps,
            "concepts": 2,
            "s_per_image": seconds,
            "peak_memory_bytes": peak,
        }

    def modular_guiders(self) -> dict:
        """SDXL: SafetyGuider / SemanticGuider(2) vs diffusers' CFG guider on the modular pipeline, and
        guide() on the classic pipeline, side by side."""
        from diffusers.guiders import ClassifierFreeGuidance
        from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

        from safe_diffusion import (
            SafetyGuidance,
            SafetyGuider,
            SemanticGuidance,
            SemanticGuider,
            guide,
            with_guidance_concepts,
        )
        from safe_diffusion.testing.realsize import REAL_SIZES

        classic = self.pipeline("sdxl", self.gpu_dtype("sdxl"))
        modular = with_guidance_concepts(StableDiffusionXLAutoBlocks()).init_pipeline()
        modular.update_components(
            **{
                k: v
                for k, v in classic.components.items()
                if k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
            }
        )
        spec = REAL_SIZES["sdxl"].native_call(tiny=self.plan.tiny)
        steps = 2 if self.plan.quick or self.plan.tiny else 4
        call = dict(num_inference_steps=steps, height=spec["height"], width=spec["width"])
        scale = spec["guidance_scale"]
        concepts_ = ["sunglasses", "a red hat"]

        def run_modular(guider):
            def run():
                modular.update_components(guider=guider)
                modular(prompt=self.prompt, generator=torch.Generator().manual_seed(0), output="latents", **call)

            return run

        def run_classic(*terms):
            def run():
                with torch.inference_mode(), guide(classic, *terms):
                    classic(
                        self.prompt,
                        generator=torch.Generator().manual_seed(0),
                        guidance_scale=scale,
                        output_type="latent",
                        **call,
                    )

            return run

        configs = {
            "modular_cfg": run_modular(ClassifierFreeGuidance(guidance_scale=scale)),
            "modular_sld": run_modular(SafetyGuider.from_preset("medium")),
            "modular_sega_2": run_modular(SemanticGuider(concepts=concepts_)),
            "classic_cfg": run_classic(),
            "classic_sld": run_classic(SafetyGuidance.from_preset("medium")),
            "classic_sega_2": run_classic(SemanticGuidance(concepts_)),
        }
        for fn in configs.values():
            fn()  # warm-up
        best, peaks = {}, {}
        for _ in range(self.plan.repeats):
            for name, fn in configs.items():
                seconds, peak = self.measure(fn)
                best[name] = min(best.get(name, float("inf")), seconds)
                peaks[name] = peak
        return {
            "steps": steps,
            "batch": 1,
            "size": f"{call['width']}x{call['height']}",
            "s_per_image": best,
            "modular_sld_over_cfg_guider": best["modular_sld"] / best["modular_cfg"],
            "modular_sega_2_over_cfg_guider": best["modular_sega_2"] / best["modular_cfg"],
            "modular_over_classic": {
                "cfg": best["modular_cfg"] / best["classic_cfg"],
                "sld": best["modular_sld"] / best["classic_sld"],
                "sega_2": best["modular_sega_2"] / best["classic_sega_2"],
            },
            "peak_memory_bytes": peaks,
        }

    # -- the table -----------------------------------------------------------------------------------------
    @staticmethod
    def summary(name: str, s: dict) -> str:
        """One Markdown line for a section's result."""
        if "skipped" in s:
            return f"skipped ({s['skipped']})"
        if "error" in s:
            return f"failed ({s['error']})"
        if name == "uce_rece":
            uce = ", ".join(f"{s['uce_s'][k]:.2f}" for k in ("1", "10", "100"))
            rece = ", ".join(f"{s['rece_s'][k]:.2f}" for k in ("1", "10", "100"))
            return f"UCE {uce} s and RECE (3 epochs) {rece} s for 1, 10, 100 concepts ({s['anchor']})."
        if name == "esd":
            return f"ESD-x {s['steps_per_s']:.3f} training steps/s ({s['ddim_steps']} DDIM steps to sample x_t)."
        if name == "judges":
            rates = ", ".join(f"{k} {v:.1f}" for k, v in s["images_per_s"].items())
            line = f"images/s on {s['images']} {s['image_side']}px images: {rates}"
            if s.get("decoding_in_line_images_per_s"):
                in_line = ", ".join(f"{v:.1f}" for v in s["decoding_in_line_images_per_s"].values())
                line += f" (files decoded in line, as before the read-ahead: {in_line})"
            return line + "."
        if name == "llavaguard":
            return f"LlavaGuard {s['images_per_s']:.2f} images/s ({s['dtype']}, {s['max_new_tokens']} new tokens)."
        if name == "i2p_end_to_end":
            return (
                f"{s['prompts']} prompts at {s['steps']} steps, SLD {s['safety']}: generation "
                f"{s['generation_images_per_s']:.3f} images/s; end to end (with Q16 + NudeNet) "
                f"{s['end_to_end_images_per_s']:.3f} vs naive loop {s['naive_end_to_end_images_per_s']:.3f} "
                f"images/s ({s['speedup']:.2f}x)."
            )
        if name == "ledits":
            return f"LEDITS++ {s['s_per_image']:.2f} s per image (inversion + edit, {s['inversion_steps']} steps)."
        if name == "modular_guiders":
            m = s["modular_over_classic"]
            return (
                f"SafetyGuider / CFG guider {s['modular_sld_over_cfg_guider']:.2f} (floor 1.5), "
                f"SemanticGuider(2) / CFG guider {s['modular_sega_2_over_cfg_guider']:.2f} (floor 2.0); "
                f"modular / classic guide(): CFG {m['cfg']:.2f}, SLD {m['sld']:.2f}, SEGA(2) {m['sega_2']:.2f}."
            )
        return str(s)
