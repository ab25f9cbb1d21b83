"""Performance at real size (issue 23): what SLD, SEGA, a negative prompt, erasure, the judges and LEDITS++
cost on models of the published sizes, timed side by side in one run.

    PYTHONPATH=src python benchmarks/realsize.py --device cuda --json benchmarks/results/realsize-cuda.json
    PYTHONPATH=src python benchmarks/realsize.py --device cpu --json benchmarks/results/realsize-cpu.json
    PYTHONPATH=src python benchmarks/realsize.py --tiny --json /tmp/tiny.json      # the same code, tiny models

Models are random-weight pipelines built in memory at the architectures of the published checkpoints
(:mod:`safe_diffusion.testing.realsize`): they cost what the real ones cost; nothing is downloaded.

What is timed, per family (``--families``), in one process, round-robin over the configurations so that
machine noise hits them alike, best of ``--repeats``: one pipeline call per configuration with
``output_type="latent"`` (text encoding and the denoising loop; the VAE decode is timed once apart):
plain CFG; the engine with a term that adds no rows and corrects nothing (its own cost: hooks, per-call
state, the zero correction); CFG with the safety concept as negative prompt; SLD with each preset; SEGA
with 1, 2, 3 concepts; on the families SAFREE is defined for (SD 1.x, SDXL, SD 3 with T5), SAFREE alone
and with SLD MAX. Floors are the denoiser rows each configuration evaluated (counted, not assumed)
over CFG's: a denoiser-dominated step cannot cost less. Peak device memory of each call is recorded
(CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, reset before each call).

Then, for SD 1.5 (the I2P protocol's model, in float32): UCE and RECE, one batched solve for 1, 10, 100
concepts; ESD training steps per second; the evaluation stages in images per second (Q16, NudeNet,
CLIP score, FID features, LlavaGuard) and the I2P run end to end (generation at the protocol's
settings + Q16 + NudeNet) against a naive loop, one prompt at a time, as the official script; LEDITS++
inversion + edit per image. For SDXL: ``SafetyGuider`` / ``SemanticGuider`` against diffusers' CFG guider
on the modular pipeline, and guide() on the classic one.

Plans (each figure in the JSON says what it was measured on):

* ``--device cuda`` (full plan): every family at native resolution in its GPU dtype, 3-4 steps, batch
  1-4 (Wan 2.1 at 33 frames instead of 81), 2 repeats after a 1-step warm-up round; all sections;
  evaluation at 50 steps. Measured: 336 s on one H200 (2026-12-04), plus the machine's start; a time budget
  (``--budget-s``, default 420; what has started runs to its end) skips what would not fit, and says so.
* ``--device cpu`` (quick plan, also ``--quick`` on any device): SD 1.5 only, 512x512, batch 1, 2 steps,
  1 repeat after a 1-step CFG warm-up, float32; UCE/RECE and the judges on 4 images; ESD, LlavaGuard,
  the I2P end-to-end run, LEDITS++ and the decode are skipped. About 8 minutes on 2 idle cores
  (``--budget-s`` default 600).
* ``--tiny``: every family and every section on shrunken models, in seconds (the test suite runs it).

Writes ``--json FILE`` (schema ``safe-diffusion.realsize/1``: ``meta`` and one key per family, e.g.
``sd15``) and the Markdown table beside it (``FILE`` with ``.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the modular pipelines' nested loops keep their own bars
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realsize_sections import SECTIONS, Sections  # noqa: E402

SCHEMA = "safe-diffusion.realsize/1"
PROMPT = "a photograph of a lighthouse on a cliff at dusk"
SEGA_CONCEPTS = ["sunglasses", "a red hat", "a snowy landscape"]
PRESETS = ("weak", "medium", "strong", "max")
CPU_FAMILIES = ("sd15",)

#: Per family on the GPU: (steps, batch, call overrides). Chosen so the whole run fits in about 7 minutes (336 s measured on an H200).
GPU_PLAN = {
    "sd15": (4, 4, {}),
    "sdxl": (4, 2, {}),
    "sd35-medium": (4, 1, {}),
    "flux-dev": (3, 1, {}),
    "flux-dev-no-guidance-embeds": (3, 1, {}),
    "pixart-sigma": (4, 2, {}),
    "wan2.1-1.3b": (2, 1, {"num_frames": 33}),
}


@dataclass
class Plan:
    device: str
    tiny: bool
    quick: bool
    families: list[str]
    repeats: int
    warmup_round: bool  # one 1-step call of every configuration before timing (else one of CFG only)
    decode: bool
    budget_s: float
    steps: int | None  # overrides
    batch: int | None
    eval_steps: int
    eval_prompts: int
    judge_images: int
    skip: dict  # section -> why it is not run in this plan

    def family_settings(self, family: str) -> tuple[int, int, dict]:
        if self.tiny or self.quick:
            steps, batch, extra = 2, 1, {}
        else:
            steps, batch, extra = GPU_PLAN[family]
        return self.steps or steps, self.batch or batch, extra


def make_plan(args) -> Plan:
    from safe_diffusion.testing.realsize import REAL_SIZES

    quick = args.quick or (args.device == "cpu" and not args.tiny)
    families = args.families.split(",") if args.families else (list(CPU_FAMILIES) if quick else list(REAL_SIZES))
    for f in families:
        if f not in REAL_SIZES:
            raise SystemExit(f"error: unknown family {f!r}; choose from: {', '.join(REAL_SIZES)}")
    skip = {}
    if quick:
        why = "not in the quick (CPU) plan: too slow at real size on a CPU"
        skip = dict.fromkeys(("esd", "llavaguard", "i2p_end_to_end", "ledits", "modular_guiders"), why)
    if args.sections is not None:
        chosen = [s for s in args.sections.split(",") if s]
        known = [name for name, _ in SECTIONS]
        for s in chosen:
            if s not in known:
                raise SystemExit(f"error: unknown section {s!r}; choose from: {', '.join(known)}")
        skip.update({name: "not chosen (--sections)" for name in known if name not in chosen and name not in skip})
    # A family or section that starts before the budget runs to its end (at most about a minute on a GPU).
    budget = args.budget_s if args.budget_s is not None else (600.0 if quick or args.tiny else 420.0)
    return Plan(
        device=args.device,
        tiny=args.tiny,
        quick=quick,
        families=families,
        repeats=args.repeats or (1 if quick or args.tiny else 2),
        warmup_round=not (quick or args.tiny),
        decode=not quick,
        budget_s=budget,
        steps=args.steps,
        batch=args.batch,
        eval_steps=2 if (quick or args.tiny) else 50,
        eval_prompts=2 if args.tiny else 8,
        judge_images=4 if (quick or args.tiny) else 32,
        skip=skip,
    )


# -- measuring ------------------------------------------------------------------------------------------


class Budget:
    """The run's time budget: a section or a round starts only when its estimate fits in what is left."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate: float = 0.0) -> bool:
        return self.elapsed() + estimate <= self.seconds


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # Linux: writing 5 resets the process's peak RSS (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def _peak(device) -> int | None:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(fn, device) -> tuple[float, int | None]:
    """Seconds of one call of `fn` (device synchronised) and the peak memory during it."""
    sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start, _peak(device)


class RowCounter:
    """Counts the rows (batch entries) the denoiser evaluates, from its raw output (before any hook edits it)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.rows += int(out.shape[0])


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the guidance comparison ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoTerm:
    """A guidance term that needs no concept and corrects nothing: what the engine itself costs per call."""

    @property
    def concepts(self) -> list:
        return []

    def needs(self, step: int) -> list[bool]:
        return []

    def initial_state(self):
        return None

    def apply(self, eps_uncond, eps_text, eps_concepts, step, state, guidance_scale):
        return torch.zeros_like(eps_text), state

    def describe(self, prediction=None) -> dict:
        return {"type": "NoTerm"}


def configurations() -> dict[str, tuple[tuple, dict]]:
    """Name → (guidance terms, extra call arguments)."""
    from safe_diffusion import SafetyGuidance, SemanticGuidance
    from safe_diffusion.guidance.sld import DEFAULT_SAFETY_CONCEPT

    configs = {
        "cfg": ((), {}),
        "no_terms": ((NoTerm(),), {}),
        "negative_prompt": ((), {"negative_prompt": DEFAULT_SAFETY_CONCEPT}),
    }
    for preset in PRESETS:
        configs[f"sld_{preset}"] = ((SafetyGuidance.from_preset(preset),), {})
    for n in (1, 2, 3):  # diffusers' SEGA defaults: warm-up 10, momentum 0.1 (so the rows run from step 0)
        configs[f"sega_{n}"] = ((SemanticGuidance(SEGA_CONCEPTS[:n]),), {})
    return configs


def safree_configurations(pipe) -> dict[str, tuple[tuple, dict]]:
    """SAFREE (filtering at every step, the official defaults otherwise) alone and with SLD MAX, for the pipelines
    SAFREE is defined for; none for the others (its check refuses them)."""
    from safe_diffusion import SafetyGuidance, SafreeGuidance
    from safe_diffusion.common.errors import GuidanceError
    from safe_diffusion.engine.hooks import check_call_hook_terms

    term = SafreeGuidance()
    try:
        check_call_hook_terms([term], pipe)
    except GuidanceError:
        return {}
    return {"safree": ((term,), {}), "safree_sld": ((term, SafetyGuidance.from_preset("max")), {})}


def guidance_section(pipe, family: str, plan: Plan, budget: Budget, out: dict) -> None:
    from safe_diffusion import guide
    from safe_diffusion.testing.realsize import REAL_SIZES

    spec = REAL_SIZES[family]
    steps, batch, extra = plan.family_settings(family)
    base = {**spec.native_call(tiny=plan.tiny), **extra}
    out.update(steps=steps, batch=batch, call={k: v for k, v in base.items() if k != "negative_prompt"})
    configs = configurations()
    safree = safree_configurations(pipe)
    configs.update(safree)
    counter = RowCounter(denoiser_of(pipe))
    per_prompt = "num_videos_per_prompt" if spec.num_frames is not None else "num_images_per_prompt"

    def call(name, num_steps, output_type="latent"):
        terms, more = configs[name]
        kwargs = {**base, **more, "num_inference_steps": num_steps, "output_type": output_type}

        def run():
            with torch.inference_mode(), guide(pipe, *terms):
                pipe(PROMPT, **{per_prompt: batch}, generator=torch.Generator().manual_seed(0), **kwargs)

        return run

    try:
        warm = configs if plan.warmup_round else {"cfg": configs["cfg"]}
        start = time.perf_counter()
        for name in warm:
            measure(call(name, 1), plan.device)
        warm_s = time.perf_counter() - start
        # a round costs about (rows of all configurations) / (rows of the warm-up) x steps of the warm-up
        round_estimate = warm_s * steps * (1 if plan.warmup_round else 14.5)
        times: dict[str, list[float]] = {name: [] for name in configs}
        peaks: dict[str, int | None] = {}
        rows: dict[str, int] = {}
        for r in range(plan.repeats):
            if r and not budget.fits(round_estimate):  # a family that has started gets one round
                out.setdefault("notes", []).append(f"time budget: {r} of {plan.repeats} repeats run")
                break
            start = time.perf_counter()
            for name in configs:
                counter.rows = 0
                seconds, peak = measure(call(name, steps), plan.device)
                print(f"    {name:16} {seconds:9.3f} s", flush=True)
                times[name].append(seconds)
                rows[name] = counter.rows
                peaks[name] = max(peaks.get(name) or 0, peak or 0) or None
            round_estimate = time.perf_counter() - start
    finally:
        counter.handle.remove()
    best = {name: min(v) for name, v in times.items()}
    cfg = best["cfg"]
    out["s_per_image"] = {name: t / batch for name, t in best.items()}
    out["cfg_s_per_image"] = cfg / batch
    out["sld_over_cfg"] = {p: best[f"sld_{p}"] / cfg for p in PRESETS}
    out["sld_floor"] = {p: rows[f"sld_{p}"] / rows["cfg"] for p in PRESETS}
    out["sega_over_cfg"] = {str(n): best[f"sega_{n}"] / cfg for n in (1, 2, 3)}
    out["sega_floor"] = {str(n): rows[f"sega_{n}"] / rows["cfg"] for n in (1, 2, 3)}
    out["negative_prompt_over_cfg"] = best["negative_prompt"] / cfg
    out["no_term_overhead"] = best["no_terms"] / cfg - 1.0
    if safree:  # SAFREE's families (SD 1.x, SDXL, SD 3 with T5): its cost beside CFG's and SLD MAX's
        out["safree_over_cfg"] = best["safree"] / cfg
        out["safree_over_sld_max"] = best["safree"] / best["sld_max"]
        out["safree_sld_over_sld_max"] = best["safree_sld"] / best["sld_max"]
    out["denoiser_rows_per_call"] = rows
    out["peak_memory_bytes"] = peaks
    out["repeats_run"] = len(times["cfg"])
    if plan.decode and budget.fits(2 * cfg):
        full, _ = measure(call("cfg", steps, "np"), plan.device)
        out["decode_s_per_image"] = max(full - cfg, 0.0) / batch


# -- the run -----------------------------------------------------------------------------------------------


def environment(plan: Plan) -> dict:
    import diffusers
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
            ).stdout
        )
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (a GPU machine's)
        commit, dirty = os.environ.get("REALSIZE_COMMIT"), None
    if torch.device(plan.device).type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": plan.device,
        "device_name": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def family_dtype(family: str, plan: Plan) -> torch.dtype:
    from safe_diffusion.testing.realsize import REAL_SIZES

    if torch.device(plan.device).type == "cuda":
        return getattr(torch, REAL_SIZES[family].gpu_dtype)
    return torch.float32


def build(family: str, plan: Plan, dtype: torch.dtype, out: dict | None = None):
    from safe_diffusion.testing.realsize import REAL_SIZES, build_real_pipeline, count_parameters

    start = time.perf_counter()
    pipe = build_real_pipeline(family, dtype=dtype, device=plan.device, tiny=plan.tiny)
    pipe.set_progress_bar_config(disable=True)
    sync(plan.device)
    if out is not None:
        spec = REAL_SIZES[family]
        out.update(
            checkpoint=spec.checkpoint,
            pipeline=type(pipe).__name__,
            dtype=str(dtype).removeprefix("torch."),
            build_s=time.perf_counter() - start,
            parameters={n: count_parameters(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)},
        )
    return pipe


def _failure(error: BaseException) -> str:
    """One line for a family or section that raised: the run records it and goes on with the others."""
    import traceback

    traceback.print_exc()
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def run(plan: Plan, checkpoint=lambda result: None) -> dict:
    """Every family, then every section, within the budget. `checkpoint(result)` is called after each one, so
    that a run stopped from outside (a time limit) still leaves what it had measured."""
    budget = Budget(plan.budget_s)
    result: dict = {
        "meta": {
            "schema": SCHEMA,
            **environment(plan),
            "plan": {k: v for k, v in vars(plan).items() if k not in ("skip",)},
            "skipped_sections": dict(plan.skip),
        }
    }
    # 1. the guidance comparison, every family (the first priority of the budget)
    for family in plan.families:
        out = result[family] = {}
        if not budget.fits():
            out["skipped"] = "time budget spent before this family"
            continue
        print(f"[{budget.elapsed():6.0f} s] {family}: building", flush=True)
        pipe = None
        try:
            pipe = build(family, plan, family_dtype(family, plan), out)
            print(f"[{budget.elapsed():6.0f} s] {family}: timing {len(configurations())} configurations", flush=True)
            guidance_section(pipe, family, plan, budget, out)
        except Exception as error:  # noqa: BLE001 - recorded in the results; the other families still run
            out["error"] = _failure(error)
        pipe = None
        free()
        result["meta"]["wall_s"] = budget.elapsed()
        checkpoint(result)
    # 2. the other sections (SD 1.5: erasure, evaluation, LEDITS++; SDXL: modular guiders)
    sections = Sections(plan, budget, build, measure, free, PROMPT)
    for name, family in SECTIONS:
        if family not in plan.families:
            continue
        out = result[family].setdefault("sections", {})
        if name in plan.skip:
            out[name] = {"skipped": plan.skip[name]}
            continue
        if not budget.fits():
            out[name] = {"skipped": "time budget spent"}
            continue
        print(f"[{budget.elapsed():6.0f} s] {family}: {name}", flush=True)
        try:
            out[name] = getattr(sections, name)()
        except Exception as error:  # noqa: BLE001 - recorded in the results; the other sections still run
            out[name] = {"error": _failure(error)}
        free()  # what the section loaded (the pipelines it shares with the next one are kept)
        result["meta"]["wall_s"] = budget.elapsed()
        checkpoint(result)
    sections.close()
    result["meta"]["wall_s"] = budget.elapsed()
    result["meta"]["load_average_end"] = os.getloadavg()
    return result


# -- the table ---------------------------------------------------------------------------------------------


def _mib(n) -> str:
    return "—" if not n else f"{n / 2**20:,.0f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    plan = meta["plan"]
    lines = [
        f"# Real-size benchmark ({'tiny models' if plan['tiny'] else 'random weights at the published sizes'})",
        "",
        f"Device: {meta['device']} ({meta['device_name']}, {meta['torch_threads']} torch threads); "
        f"load average {', '.join(f'{x:.1f}' for x in meta['load_average_start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in meta.get('load_average_end', ()))} at the end. "
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, transformers {meta['transformers']}; "
        f"commit {(meta['commit'] or '?')[:10]}{' (uncommitted changes)' if meta['dirty'] else ''}; {meta['date']}; "
        f"{meta['wall_s']:.0f} s in all.",
        "",
        "Seconds per image: one pipeline call (text encoding + denoising, latents out), best of the repeats. "
        "Ratios to CFG measured side by side; floor = denoiser rows evaluated / CFG's. "
        "No-term overhead: the engine attached with a term that adds no rows.",
        "",
        "| family | dtype | size | batch | steps | CFG s/image | SLD/CFG weak, medium, strong, max (floors) "
        "| SEGA(1, 2, 3)/CFG (floors) | neg. prompt/CFG | no-term overhead | SAFREE/CFG, /SLD max; +SLD max/SLD max "
        "| peak MiB CFG / SEGA(3) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, r in result.items():
        if family == "meta" or "cfg_s_per_image" not in r:
            if family != "meta" and (r.get("skipped") or r.get("error")):
                why = f"skipped: {r['skipped']}" if r.get("skipped") else f"failed: {r['error']}"
                lines.append(f"| {family} | {why} ||||||||||| ")
            continue
        call = r["call"]
        size = f"{call['width']}x{call['height']}" + (f"x{call['num_frames']}" if "num_frames" in call else "")
        sld = ", ".join(f"{r['sld_over_cfg'][p]:.2f}" for p in PRESETS)
        sld_f = ", ".join(f"{r['sld_floor'][p]:.2f}" for p in PRESETS)
        sega = ", ".join(f"{r['sega_over_cfg'][n]:.2f}" for n in ("1", "2", "3"))
        sega_f = ", ".join(f"{r['sega_floor'][n]:.2f}" for n in ("1", "2", "3"))
        peaks = r["peak_memory_bytes"]
        safree = (
            f"{r['safree_over_cfg']:.2f}, {r['safree_over_sld_max']:.2f}; {r['safree_sld_over_sld_max']:.2f}"
            if "safree_over_cfg" in r
            else "— (not defined for the family)"
        )
        lines.append(
            f"| {family} | {r['dtype']} | {size} | {r['batch']} | {r['steps']} | {r['cfg_s_per_image']:.3g} | "
            f"{sld} ({sld_f}) | {sega} ({sega_f}) | {r['negative_prompt_over_cfg']:.2f} | "
            f"{100 * r['no_term_overhead']:+.1f} % | {safree} | {_mib(peaks.get('cfg'))} / {_mib(peaks.get('sega_3'))} |"
        )
    for family, r in result.items():
        if family == "meta":
            continue
        for name, section in r.get("sections", {}).items():
            lines += ["", f"**{family} — {name}**: " + Sections.summary(name, section)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, required=True, help="output file (the Markdown table goes beside it)")
    parser.add_argument("--families", help="comma-separated (default: the plan's)")
    parser.add_argument("--quick", action="store_true", help="the reduced plan (SD 1.5, 2 steps) on any device")
    parser.add_argument("--tiny", action="store_true", help="shrunken models: the same run in seconds")
    parser.add_argument("--steps", type=int, help="override the plan's denoising steps")
    parser.add_argument("--batch", type=int, help="override the plan's images per call")
    parser.add_argument("--repeats", type=int, help="override the plan's repeats")
    parser.add_argument("--sections", help="comma-separated sections to run (default: all of the plan's)")
    parser.add_argument("--budget-s", type=float, help="skip what would start after this many seconds")
    parser.add_argument("--threads", type=int, help="torch threads on a CPU (default: all cores; 1 with --tiny)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads or (1 if args.tiny else os.cpu_count() or 1))
    torch.set_flush_denormal(True)
    plan = make_plan(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> str:
        table = markdown(result)
        for path, text in (
            (args.json, json.dumps(result, indent=2, default=str) + "\n"),
            (args.json.with_suffix(".md"), table),
        ):
            part = path.with_name(path.name + ".part")
            part.write_text(text)
            part.replace(path)
        return table

    result = run(plan, checkpoint=write)
    print(write(result))
    failed = [f for f, r in result.items() if f != "meta" and "error" in r] + [
        f"{f}/{n}" for f, r in result.items() if f != "meta" for n, s in r.get("sections", {}).items() if "error" in s
    ]
    if failed:
        print(f"error: {len(failed)} part(s) failed: {', '.join(failed)} (recorded in {args.json})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
