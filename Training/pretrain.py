"""`pretrain`: DDPM pretraining of the U-Net noise predictor on the slice dataset.

The method's recipe by default: 1000 diffusion steps, Adam, learning rate decaying linearly from 2e-4
to 2e-5, EMA 0.9999, random horizontal flips. One command for one CPU, one GPU or many (``torchrun``:
DistributedDataParallel, a distributed sampler, rank 0 logs and saves). SIGTERM/SIGINT save a
checkpoint at the end of the current step and exit, so a preempted job resumes with ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from DiffusionSegLib.atomic import write_text
from DiffusionSegLib.devices import describe_hardware
from DiffusionSegLib.diffusion import GaussianDiffusion
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.memory import default_workers, fit_batch, measure_step, out_of_memory_message, preset_size_note
from DiffusionSegLib.models import load_unet, resolve_model
from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel, count_parameters, preset_config

from .checkpoint import Checkpoint, latest_checkpoint, load_latest_checkpoint, save_checkpoint
from .samples import save_sample_grid
from .shards import SliceDataset


@dataclass
class PretrainConfig:
    preset: str = "small"
    iterations: int = 300_000
    batch_size: int = 16  # per process
    lr: float = 2e-4
    lr_final: float = 2e-5  # reached linearly at the last iteration
    ema_decay: float = 0.9999
    # Decay min(ema_decay, (1 + n) / (10 + n)) at update n, as TensorFlow's ExponentialMovingAverage with
    # num_updates: without it the EMA of a short run is still mostly the random initialisation
    # (0.9999^10000 = 0.37) and samples are noise; from ~90k steps on it is exactly ema_decay.
    ema_warmup: bool = True
    schedule: str = "cosine"
    num_timesteps: int = 1000
    hflip: bool = True
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    sample_every: int = 10_000  # 0 disables preview grids
    sample_count: int = 16
    sample_steps: int = 50
    log_every: int = 50
    workers: int | None = None  # data loader processes; default 4, at most the available cores
    seed: int = 0
    bf16: bool = True  # on CUDA with bf16 support; ignored elsewhere
    channels_last: bool = False
    compile: bool = False
    grad_checkpoint: bool = False
    fused_adam: bool = True  # where the device supports it
    # A pretrained model (name or folder) whose weights start the run instead of a random
    # initialisation, e.g. to grow a model to a larger slice size: the U-Net is convolutional and its
    # attention sits at fixed downsampling factors, so a 64 px model's weights fit at 128 px.
    init: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown pretraining settings {unknown}; known: {sorted(known)}")
        return cls(**d)


def lr_at(step: int, config: PretrainConfig) -> float:
    fraction = min(step / max(config.iterations - 1, 1), 1.0)
    return config.lr + (config.lr_final - config.lr) * fraction


def ema_decay_at(step: int, config: PretrainConfig) -> float:
    """The EMA decay for the update made at `step` (0-based)."""
    return min(config.ema_decay, (1 + step) / (10 + step)) if config.ema_warmup else config.ema_decay


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, as one fused foreach op."""
    torch._foreach_lerp_(ema, params, 1.0 - decay)


class Preemption:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a checkpoint is then saved)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process: schedulers signal the whole process
    group, and a worker that dies first would crash the main process before it saves a checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """torchrun sets RANK/WORLD_SIZE; NCCL on GPUs, gloo on the CPU."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    env = Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    return env


def _device(env: Distributed) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _check_data(data: Path, config: PretrainConfig) -> SliceDataset:
    try:
        dataset = SliceDataset(data)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    if len(dataset) == 0:
        raise InputError(f"{data}: the slice dataset is empty ({len(dataset.index.skipped)} inputs skipped; see report.json)")
    if config.preset not in PRESETS:
        raise InputError(f"--preset {config.preset}: unknown; choose one of {', '.join(sorted(PRESETS))}")
    size = dataset.index.spec.size
    try:
        preset_config(config.preset, size)
    except ValueError as e:
        raise InputError(f"--preset {config.preset} cannot run at the dataset's slice size {size}: {e}") from e
    return dataset


def _check_resume(run_dir: Path, config: PretrainConfig, resume: bool) -> tuple[Path | None, dict]:
    """The latest checkpoint to resume from (None: a new run) and the settings it was saved with ({} if unreadable)."""
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        return None, {}
    if not resume:
        raise InputError(f"{run_dir}: already holds checkpoints (latest {latest.name}); pass --resume to continue, or choose a new --out")
    try:
        saved = json.loads((latest / "state.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        return latest, {}  # damaged: load_latest_checkpoint says so and falls back to an earlier one
    if saved["preset"] != config.preset:
        raise InputError(f"{run_dir}: was trained with preset {saved['preset']}; resuming with --preset {config.preset} is not possible")
    return latest, saved


def _initialise_from(model: UNetModel, init: str, unet_config: UNetConfig) -> None:
    """Load a pretrained model's weights into `model`; the architecture must match up to the slice size."""
    folder = resolve_model(init, "pretrained")
    source, card = load_unet(folder)
    size_free = ("image_size", "attention_resolutions")  # attention is compared by downsampling factor instead
    theirs, ours = ({k: v for k, v in c.to_dict().items() if k not in size_free} for c in (card.unet, unet_config))
    if theirs != ours or card.unet.attention_downsample != unet_config.attention_downsample:
        raise InputError(f"--init {init}: its U-Net ({card.preset}, {card.unet.image_size} px) differs from --preset's at this size "
                         "in more than the slice size; choose the same preset")
    model.load_state_dict({k: v.float() for k, v in source.state_dict().items()})


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a line cut short by a kill: dropped


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (if installed), rank 0 only."""

    def __init__(self, run_dir: Path, step: int = 0) -> None:
        path = run_dir / "metrics.jsonl"
        if path.is_file():  # records past the resumed checkpoint (a kill -9 after it) would be logged twice: the curve continues from `step`
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _record_step(line) <= step]
            if len(kept) != len(lines):
                write_text(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.tensorboard = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class TrainingStopped(InputError):
    """Training cannot go on (the loss diverged, the GPU ran out of memory); the last good checkpoint is kept."""


def pretrain(data: str | Path, run_dir: str | Path, config: PretrainConfig, resume: bool = False, show_progress: bool = True,
             fit_batch_size: bool = False, stop_at: int | None = None, time_limit: float | None = None) -> dict:
    """Train (or continue training) a noise predictor; returns a summary of the run.

    `fit_batch_size`: the batch size was not chosen by the user, so on the CPU a smaller one that fits in memory may be taken.
    `stop_at`: pause after this step with a checkpoint, the learning-rate schedule still that of `config.iterations`
    (a run budgeted in pieces; `resume` continues it). Not a setting of the run, so it does not block resuming.
    `time_limit`: likewise pause, with a checkpoint, after the step during which this many seconds of the training loop have passed
    (a wall-clock budget; the first step's compilation counts, the setup before the loop does not).
    """
    data, run_dir = Path(data), Path(run_dir)
    env = setup_distributed()
    try:
        with tf32_matmuls():
            return _train(data, run_dir, config, resume, show_progress, env, fit_batch_size, stop_at, time_limit)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _guard_memory(model: UNetModel, diffusion: GaussianDiffusion, config: PretrainConfig, size: int, device: torch.device, env: Distributed,
                  may_lower: bool, run_dir: Path, bf16: bool, workers: int = 0) -> int:
    """The batch size a step fits with (see DiffusionSegLib.memory), measured before the first step in the precision training uses."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        memory = measure_step(model, lambda: diffusion.training_loss(model, torch.zeros(1, 1, size, size, device=device)))
    note = preset_size_note(config.preset, PRESETS[config.preset], size, memory.per_sample)
    if note and env.main:
        print(note, file=sys.stderr)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) if device.type == "cpu" else 1
    decision = fit_batch(memory, config.batch_size, device, may_lower=may_lower and device.type == "cpu" and env.world_size == 1,
                         what=f"pretrain {run_dir}", processes=processes, workers=workers)
    if decision.note and env.main:
        print(decision.note, file=sys.stderr)
    return decision.batch_size


def _train(data: Path, run_dir: Path, config: PretrainConfig, resume: bool, show_progress: bool, env: Distributed,
           fit_batch_size: bool = False, stop_at: int | None = None, time_limit: float | None = None) -> dict:
    dataset = _check_data(data, config)
    latest, saved_config = _check_resume(run_dir, config, resume)
    if saved_config:
        # A resumed run's weights come from its checkpoint: a different --init now changes nothing and
        # must not be recorded as the run's origin.
        started_from = saved_config.get("init", "")
        if config.init and config.init != started_from and env.main:
            print(f"pretrain: resuming; --init {config.init} is ignored (the run started from {started_from or 'random weights'})", file=sys.stderr)
        config = replace(config, init=started_from)
    device = _device(env)
    torch.manual_seed(config.seed + env.rank)
    unet_config = preset_config(config.preset, dataset.index.spec.size)
    model = UNetModel(unet_config).to(device)
    model.use_checkpoint = config.grad_checkpoint
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if latest is None and config.init:
        _initialise_from(model, config.init, unet_config)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    fused = config.fused_adam and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused or None)
    diffusion = GaussianDiffusion(config.schedule, config.num_timesteps)
    bf16 = config.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    workers = default_workers() if config.workers is None else config.workers
    batch_size = _guard_memory(model, diffusion, config, unet_config.image_size, device, env, fit_batch_size, run_dir, bf16, workers)
    # What actually runs, recorded as such in config.json and the checkpoints.
    config = replace(config, batch_size=batch_size, bf16=bf16, fused_adam=fused, workers=workers)
    step, history = 0, {"seconds": 0.0}
    if latest is not None:
        saved = load_latest_checkpoint(run_dir / "checkpoints", warn=lambda text: print(text, file=sys.stderr) if env.main else None)
        if saved is None:
            raise InputError(f"{run_dir / 'checkpoints'}: no checkpoint reads back whole (each is damaged); start a new run with another --out")
        model.load_state_dict(saved.model)
        ema.load_state_dict(saved.ema)
        optimizer.load_state_dict(saved.optimizer)
        step, history = saved.step, saved.state.get("history", history)
        torch.manual_seed(config.seed + env.rank + step)  # fresh noise after resuming, different per rank

    wrapped = DistributedDataParallel(model) if env.world_size > 1 else model
    forward = torch.compile(wrapped) if config.compile else wrapped
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0, worker_init_fn=_ignore_stop_signals,
    )
    if len(loader) == 0:
        raise InputError(f"{data}: {len(dataset)} slices are fewer than one batch of {config.batch_size} x {env.world_size} processes; lower --batch-size")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    ema_params, params = list(ema.parameters()), list(model.parameters())

    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, step) if env.main else None
    if env.main:
        write_text(run_dir / "config.json", json.dumps({"config": asdict(config), "data": str(data.resolve()), "unet": unet_config.to_dict(),
                                                        "parameters": count_parameters(model), "world_size": env.world_size}, indent=1) + "\n")
    bar = tqdm(total=config.iterations, initial=step, desc="pretrain", disable=not (show_progress and env.main), dynamic_ncols=True)
    epoch = step // len(loader)
    skip = step % len(loader)  # resume mid-epoch on the same data order
    # A resumed run that has nothing left to do still reports the loss it ended with.
    last_loss = float(saved.state.get("final_loss") or math.nan) if latest is not None else math.nan
    window_start, window_images = time.monotonic(), 0
    stopped_by = "iterations"

    def checkpoint() -> None:
        if env.main:
            state = {"config": asdict(config), "unet": unet_config.to_dict(), "schedule": diffusion.to_dict(), "data": str(data.resolve()),
                     "preprocessing": dataset.index.spec.to_dict(), "history": history, "final_loss": last_loss,
                     "hardware": describe_hardware(device, env.world_size)}
            save_checkpoint(run_dir / "checkpoints", Checkpoint(step, model.state_dict(), ema.state_dict(), optimizer.state_dict(), state),
                            config.keep_checkpoints)
        if env.world_size > 1:
            dist.barrier()

    with Preemption() as preemption:
        end = min(config.iterations, stop_at) if stop_at is not None else config.iterations
        deadline = time.monotonic() + time_limit if time_limit is not None else math.inf
        while step < end and stopped_by == "iterations":
            sampler.set_epoch(epoch)
            for i, x0 in enumerate(loader):
                if i < skip:
                    continue
                x0 = x0.to(device, non_blocking=True)
                if config.hflip:
                    flip = torch.rand(x0.shape[0], device=device) < 0.5
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                if config.channels_last:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config)
                try:
                    with autocast:
                        loss = diffusion.training_loss(forward, x0)
                    if not torch.isfinite(loss.detach()):  # before the update: the weights stay those of the last good step
                        raise TrainingStopped(f"pretrain {run_dir}: the loss became {float(loss.detach())} at step {step + 1}; stopped without "
                                              f"updating the weights; {_kept(run_dir)}; resume with --resume and a lower --lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                except torch.cuda.OutOfMemoryError as e:
                    raise TrainingStopped(out_of_memory_message(f"pretrain {run_dir}", step + 1, x0.shape[0], _kept(run_dir))) from e
                update_ema(ema_params, params, ema_decay_at(step, config))
                step += 1
                last_loss = float(loss.detach())
                window_images += x0.shape[0] * env.world_size
                bar.update()
                if env.main and (step % config.log_every == 0 or step == config.iterations):
                    elapsed = time.monotonic() - window_start
                    history["seconds"] += elapsed
                    log.write({"step": step, "loss": last_loss, "lr": lr_at(step - 1, config), "images_per_s": window_images / elapsed,
                               "time": time.time()})
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    window_start, window_images = time.monotonic(), 0
                if config.sample_every and step % config.sample_every == 0 and env.main:
                    save_sample_grid(ema, diffusion, run_dir / "samples" / f"step-{step:08d}.png", config.sample_count, config.sample_steps, device)
                stop = _agree(preemption.requested, env, device)
                # Every rank agrees on the budget too: their clocks differ by a step's skew.
                out_of_time = _agree(time.monotonic() >= deadline, env, device) if time_limit is not None else False
                if step % config.checkpoint_every == 0 or step == end or stop or out_of_time:
                    checkpoint()
                if stop or out_of_time:
                    stopped_by = "signal" if stop else "time-limit"
                    break
                if step >= end:
                    break
            epoch, skip = epoch + 1, 0
    if stopped_by == "iterations" and step < config.iterations:  # paused by stop_at (also when resumed at or past it)
        stopped_by = "stop-at"
    bar.close()
    if log is not None:
        log.close()
    return {"step": step, "stopped_by": stopped_by, "final_loss": last_loss}


def _kept(run_dir: Path) -> str:
    latest = latest_checkpoint(run_dir / "checkpoints")
    return f"the last checkpoint {latest} is kept" if latest else "no checkpoint had been saved yet"


def _agree(flag: bool, env: Distributed, device: torch.device) -> bool:
    """True on every rank if any rank was asked to stop, so all ranks stop at the same step."""
    if env.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """TF32 matmuls and convolutions (faster fp32 on Ampere+ GPUs, fine for training) inside the block only, so importing this
    module or evaluating generation (Inception features) keeps PyTorch's own settings."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
