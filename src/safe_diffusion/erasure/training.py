"""ESD fine-tuning with ``accelerate``: one GPU or several, mixed precision, gradient checkpointing,
checkpoints every N steps and exact resume after a kill.

Determinism: step k of process p draws its concept, its number of DDIM steps and its starting noise
from its own ``torch.Generator`` seeded with (seed, k, p), so a run resumed from a checkpoint (the
trained parameters and Adam's state, saved losslessly as safetensors) continues with exactly the
draws an uninterrupted run makes, and ends with the same weights on the same hardware and process count.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common.errors import InputError
from ..common.outputs import atomic_write_json
from ..common.progress import ProgressLog
from .common import encode, esd_parameter_names, is_sdxl, move
from .esd import classifier_free_guidance, esd_loss, esd_target

CHECKPOINTS = "checkpoints"


@dataclass
class ESDSample:
    """One training example: the latent x_t, its timestep t, the concept's index, the DDIM steps taken."""

    x: torch.Tensor
    timestep: torch.Tensor
    concept: int
    ddim_index: int


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The CPU generator of training step `step` in process `process`: independent of anything run before."""
    state = np.random.SeedSequence([seed, step, process]).generate_state(2, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(state[0] % (2**63)))


def resolve_gradient_checkpointing(setting: str, pipe) -> bool:
    """``auto``: on for SDXL (1024² activations dominate memory), off for SD 1.x/2.x (fits, and is faster)."""
    return is_sdxl(pipe) if setting == "auto" else setting == "on"


class ESDTrainer:
    """Fine-tunes a copy of ``pipe.unet`` with ESD's negative-guidance objective; the original stays frozen.

    x_t comes from the frozen model: DDIM from noise for a random number of the `ddim_steps` steps,
    with classifier-free guidance `start_guidance` on the concept (as the authors' diffusers code does).
    """

    def __init__(
        self,
        pipe,
        method: str,
        concepts: list[str],
        *,
        lr: float = 1e-5,
        negative_guidance: float = 1.0,
        start_guidance: float = 3.0,
        ddim_steps: int = 50,
        resolution: int | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        accelerator=None,
    ):
        from accelerate import Accelerator
        from diffusers import DDIMScheduler

        self.accelerator = accelerator or Accelerator(cpu=pipe.unet.device.type == "cpu")
        acc = self.accelerator
        device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        self.method, self.concepts, self.seed = method, list(concepts), seed
        self.negative_guidance, self.start_guidance = negative_guidance, start_guidance
        self.sdxl = is_sdxl(pipe)

        with torch.no_grad():
            embeds, pooled = encode(pipe, [*self.concepts, ""])
        self.embeds = embeds.to(device, self.weight_dtype)
        self.pooled = None if pooled is None else pooled.to(device, self.weight_dtype)

        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if getattr(pipe, "vae", None) else 8
        size = pipe.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        self.resolution = resolution or size * vae_scale
        if self.resolution % vae_scale:
            raise InputError(f"--resolution must be a multiple of {vae_scale} for this model, got {self.resolution}")
        self.latent_shape = (
            1,
            pipe.unet.config.in_channels,
            self.resolution // vae_scale,
            self.resolution // vae_scale,
        )

        # clip_sample=False whatever the base config says (a config without the key would default to clipping
        # x₀ to [-1, 1]); neither official ESD code clips.
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        self.scheduler.set_timesteps(ddim_steps, device=device)
        self.ddim_steps = ddim_steps

        trained = move(copy.deepcopy(pipe.unet), device, torch.float32)
        self.param_names = esd_parameter_names(trained, method)
        wanted = set(self.param_names)
        for name, p in trained.named_parameters():
            p.requires_grad_(name in wanted)
        if gradient_checkpointing:
            trained.enable_gradient_checkpointing()
        trained.train()
        self.frozen = move(pipe.unet, device, self.weight_dtype).eval().requires_grad_(False)
        params = [p for n, p in trained.named_parameters() if n in wanted]
        optimizer = torch.optim.Adam(params, lr=lr)
        self.trained, self.optimizer = acc.prepare(trained, optimizer)

    # -- one step -------------------------------------------------------------------------------
    def _cond(self, rows: list[int], dtype: torch.dtype) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds[rows].to(dtype)}
        if self.sdxl:
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=self.embeds.device, dtype=dtype).repeat(len(rows), 1)
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled[rows].to(dtype), "time_ids": time_ids}
        return kwargs

    @torch.no_grad()
    def sample(self, step: int) -> ESDSample:
        """Step `step`'s x_t: the frozen model's DDIM trajectory for its concept, stopped at a random step."""
        g = step_generator(self.seed, step, self.accelerator.process_index)
        concept = int(torch.randint(len(self.concepts), (1,), generator=g))
        index = int(torch.randint(self.ddim_steps, (1,), generator=g))
        noise = torch.randn(self.latent_shape, generator=g, dtype=torch.float32)
        x = noise.to(self.embeds.device) * self.scheduler.init_noise_sigma
        null = len(self.concepts)
        cond = self._cond([null, concept], self.weight_dtype)
        for t in self.scheduler.timesteps[:index]:
            inp = self.scheduler.scale_model_input(torch.cat([x, x]), t).to(self.weight_dtype)
            eps_uncond, eps_concept = self.frozen(inp, t, **cond).sample.float().chunk(2)
            x = self.scheduler.step(
                classifier_free_guidance(eps_uncond, eps_concept, self.start_guidance), t, x
            ).prev_sample
        return ESDSample(x, self.scheduler.timesteps[index], concept, index)

    @torch.no_grad()
    def target(self, sample: ESDSample) -> torch.Tensor:
        """ESD's target at the sample: the frozen model's noise, negatively guided away from the concept."""
        x = self.scheduler.scale_model_input(torch.cat([sample.x, sample.x]), sample.timestep).to(self.weight_dtype)
        cond = self._cond([len(self.concepts), sample.concept], self.weight_dtype)
        eps_uncond, eps_concept = self.frozen(x, sample.timestep, **cond).sample.float().chunk(2)
        return esd_target(eps_uncond, eps_concept, self.negative_guidance)

    def loss(self, sample: ESDSample, target: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, c, t) of the model being trained against the target (with gradients)."""
        x = self.scheduler.scale_model_input(sample.x, sample.timestep)
        pred = self.trained(x, sample.timestep, **self._cond([sample.concept], torch.float32)).sample
        return esd_loss(pred, target)

    def train_step(self, step: int) -> float:
        """One optimisation step; returns the loss averaged over processes."""
        sample = self.sample(step)
        target = self.target(sample)
        loss = self.loss(sample, target)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(loss.detach(), "mean"))

    # -- weights and checkpoints ------------------------------------------------------------------
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.trained)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The fine-tuned parameters (float32), keyed by UNet parameter name."""
        params = dict(self.unwrapped().named_parameters())
        return {n: params[n].detach().float().cpu().clone() for n in self.param_names}

    def save_checkpoint(self, folder: Path, step: int, info: dict) -> None:
        """Write the state after `step` steps into `folder` atomically (built beside it, then renamed)."""
        from safetensors.torch import save_file

        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.trained_weights(), str(tmp / "trainable.safetensors"))
        opt = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        for f in ("trainable.safetensors", "optimizer.safetensors"):
            fd = os.open(tmp / f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
        atomic_write_json(tmp / "state.json", {**info, "step": step, "optimizer_scalars": scalars, "scaler": scaler})
        os.rename(tmp, folder)

    def load_checkpoint(self, folder: Path) -> dict:
        """Restore the trained parameters, Adam's state and the loss scaler; returns the checkpoint's info."""
        from safetensors.torch import load_file

        info = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.unwrapped().named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device))
        flat = load_file(str(folder / "optimizer.safetensors"))
        state: dict[int, dict] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for key, value in info.get("optimizer_scalars", {}).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        if info.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(info["scaler"])
        return info


def latest_checkpoint(work: Path) -> Path | None:
    """The most advanced complete checkpoint under `work` (incomplete ones are hidden temporaries)."""
    folder = work / CHECKPOINTS
    done = [p for p in folder.glob("step-*") if (p / "state.json").is_file()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run_esd(
    trainer: ESDTrainer,
    *,
    steps: int,
    checkpoint_every: int,
    work: Path,
    fingerprint: str,
    show_progress: bool = True,
) -> dict:
    """Train for `steps` steps, resuming from the latest checkpoint in `work` made with the same
    `fingerprint`, checkpointing every `checkpoint_every` steps; returns the training record."""
    acc = trainer.accelerator
    main = acc.is_main_process
    start, losses, resumed = 0, [], []
    ckpt = latest_checkpoint(work)
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            raise InputError(
                f"{work} holds an unfinished run with other settings (model, concepts or hyper-parameters); "
                "rerun with the same settings to resume it, or delete that folder to start over"
            )
        info = trainer.load_checkpoint(ckpt)
        start, losses, resumed = (
            info["step"],
            list(info["losses"])[: info["step"]],
            [*info.get("resumed", []), info["step"]],
        )
    label = {"esd-x": "ESD-x", "esd-u": "ESD-u"}[trainer.method]
    progress = ProgressLog(label, steps, unit="steps", start=start, enabled=show_progress and main)
    if start:
        progress.line(f"{label}: resuming from step {start} ({ckpt})")
    t0 = time.monotonic()
    try:
        for step in range(start, steps):
            losses.append(trainer.train_step(step))
            done = step + 1
            window = losses[-20:]
            progress.set(done, f"loss {sum(window) / len(window):.4g}")
            if done % checkpoint_every == 0 and done < steps:
                if main:
                    folder = work / CHECKPOINTS / f"step-{done:08d}"
                    trainer.save_checkpoint(
                        folder, done, {"fingerprint": fingerprint, "losses": losses, "resumed": resumed}
                    )
                    for old in (work / CHECKPOINTS).glob("step-*"):
                        if old != folder:
                            shutil.rmtree(old, ignore_errors=True)
                    progress.line(f"{label}: checkpoint at step {done}")
                acc.wait_for_everyone()
    finally:
        progress.close()
    seconds = time.monotonic() - t0
    return {
        "steps": steps,
        "losses": losses,
        "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "resumed_at": resumed,
        "seconds_this_session": seconds,
        "steps_per_second": (steps - start) / seconds if seconds > 0 and steps > start else None,
        "processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "device": str(acc.device),
        "resolution": trainer.resolution,
        "trained_parameters": len(trainer.param_names),
        "trained_values": int(sum(w.numel() for w in trainer.trained_weights().values())),
    }
