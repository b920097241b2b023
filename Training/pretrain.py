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
from DiffusionSegLib.memory import available_memory, default_workers, fit_batch, measure_step, out_of_memory_message, preset_size_note
from DiffusionSegLib.models import load_unet, resolve_model
from DiffusionSegLib.unet import PRESETS, UNetConfig, UNetModel, count_parameters, preset_config

from .checkpoint import Checkpoint, latest_checkpoint, load_latest_checkpoint, save_checkpoint
from .diffusion_samples import save_sample_grid
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
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) if device.type == "cpu" else 1
    free = available_memory(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        memory = measure_step(model, lambda n: diffusion.training_loss(model, torch.zeros(n, 1, size, size, device=device)),
                              config.batch_size, available=free // processes)
    note = preset_size_note(config.preset, PRESETS[config.preset], size, memory.per_sample)
    if note and env.main:
        print(note, file=sys.stderr)
    decision = fit_batch(memory, config.batch_size, device, may_lower=may_lower and device.type == "cpu" and env.world_size == 1,
                         what=f"pretrain {run_dir}", available=free, processes=processes, workers=workers)
    if decision.note and env.main:
        print(decision.note, file=sys.stderr)
    return decision.batch_size


def _train(data: Path, run_dir: Path, config: PretrainConfig, resume: bool, show_progress: bool, env: Distributed,
           fit_batch_size: bool = False, stop_at: int | None = None, time_limit: float | None = None) -> dict:
    dataset = _check_data(data, config)
    latest, saved_config = _check_resume(run_dir, config, resume)
    config = _resumed_config(config, saved_config, env)
    run = _Run(data, run_dir, dataset, config, env, _device(env), fit_batch_size, resuming=latest is not None)
    if latest is not None:
        run.restore()
    return run.train(show_progress, stop_at, time_limit)


def _resumed_config(config: PretrainConfig, saved_config: dict, env: Distributed) -> PretrainConfig:
    """A resumed run's weights come from its checkpoint: a different --init now changes nothing and must not be recorded as its origin."""
    if not saved_config:
        return config
    started_from = saved_config.get("init", "")
    if config.init and config.init != started_from and env.main:
        print(f"pretrain: resuming; --init {config.init} is ignored (the run started from {started_from or 'random weights'})", file=sys.stderr)
    return replace(config, init=started_from)


class _Run:
    """One pretraining run: the network, its EMA and optimiser, where the run stands, and the loop that moves it on."""

    def __init__(self, data: Path, run_dir: Path, dataset: SliceDataset, config: PretrainConfig, env: Distributed, device: torch.device,
                 fit_batch_size: bool, resuming: bool) -> None:
        self.data, self.run_dir, self.dataset, self.env, self.device = data, run_dir, dataset, env, device
        torch.manual_seed(config.seed + env.rank)
        self.unet_config = preset_config(config.preset, dataset.index.spec.size)
        model = UNetModel(self.unet_config).to(device)
        model.use_checkpoint = config.grad_checkpoint
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.init and not resuming:
            _initialise_from(model, config.init, self.unet_config)
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        fused = config.fused_adam and device.type == "cuda"
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused or None)
        self._ema_params, self._params = list(self.ema.parameters()), list(model.parameters())
        self.diffusion = GaussianDiffusion(config.schedule, config.num_timesteps)
        bf16 = config.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
        workers = default_workers() if config.workers is None else config.workers
        batch_size = _guard_memory(model, self.diffusion, config, self.unet_config.image_size, device, env, fit_batch_size, run_dir, bf16, workers)
        # What actually runs, recorded as such in config.json and the checkpoints.
        self.config = replace(config, batch_size=batch_size, bf16=bf16, fused_adam=fused, workers=workers)
        self.step, self.history = 0, {"seconds": 0.0}
        self.last_loss = math.nan
        self._window = (time.monotonic(), 0)  # start and images of the current throughput window

    def restore(self) -> None:
        """Continue from the newest checkpoint that reads back whole."""
        warn = (lambda text: print(text, file=sys.stderr)) if self.env.main else (lambda text: None)
        saved = load_latest_checkpoint(self.run_dir / "checkpoints", warn=warn)
        if saved is None:
            raise InputError(f"{self.run_dir / 'checkpoints'}: no checkpoint reads back whole (each is damaged); start a new run with another --out")
        self.model.load_state_dict(saved.model)
        self.ema.load_state_dict(saved.ema)
        self.optimizer.load_state_dict(saved.optimizer)
        self.step, self.history = saved.step, saved.state.get("history", self.history)
        self.last_loss = float(saved.state.get("final_loss") or math.nan)  # a run with nothing left to do still reports the loss it ended with
        torch.manual_seed(self.config.seed + self.env.rank + self.step)  # fresh noise after resuming, different per rank

    def _loader(self) -> tuple[DistributedSampler, DataLoader]:
        config, env = self.config, self.env
        sampler = DistributedSampler(self.dataset, env.world_size, env.rank, shuffle=True, seed=config.seed, drop_last=True)
        loader = DataLoader(
            self.dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers, drop_last=True,
            pin_memory=self.device.type == "cuda", persistent_workers=config.workers > 0, worker_init_fn=_ignore_stop_signals,
        )
        if len(loader) == 0:
            raise InputError(f"{self.data}: {len(self.dataset)} slices are fewer than one batch of {config.batch_size} x {env.world_size} processes; "
                             "lower --batch-size")
        return sampler, loader

    def _start_log(self) -> MetricsLog | None:
        """metrics.jsonl (continued from the current step) and config.json, on rank 0."""
        if not self.env.main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.run_dir, self.step)
        record = {"config": asdict(self.config), "data": str(self.data.resolve()), "unet": self.unet_config.to_dict(),
                  "parameters": count_parameters(self.model), "world_size": self.env.world_size}
        write_text(self.run_dir / "config.json", json.dumps(record, indent=1) + "\n")
        return log

    def train(self, show_progress: bool, stop_at: int | None, time_limit: float | None) -> dict:
        """Steps until the iterations (or `stop_at`) are done, the time is up or a stop signal came; a checkpoint at the end."""
        config, env = self.config, self.env
        wrapped = DistributedDataParallel(self.model) if env.world_size > 1 else self.model
        forward = torch.compile(wrapped) if config.compile else wrapped
        sampler, loader = self._loader()
        log = self._start_log()
        bar = tqdm(total=config.iterations, initial=self.step, desc="pretrain", disable=not (show_progress and env.main), dynamic_ncols=True)
        epoch, skip = divmod(self.step, len(loader))  # resume mid-epoch on the same data order
        self._window = (time.monotonic(), 0)
        stopped_by = "iterations"
        with Preemption() as preemption:
            end = min(config.iterations, stop_at) if stop_at is not None else config.iterations
            deadline = time.monotonic() + time_limit if time_limit is not None else math.inf
            while self.step < end and stopped_by == "iterations":
                sampler.set_epoch(epoch)
                for i, x0 in enumerate(loader):
                    if i < skip:
                        continue
                    self._train_step(forward, x0)
                    bar.update()
                    self._report(log, bar)
                    stop = _agree(preemption.requested, env, self.device)
                    # Every rank agrees on the budget too: their clocks differ by a step's skew.
                    out_of_time = _agree(time.monotonic() >= deadline, env, self.device) if time_limit is not None else False
                    if self.step % config.checkpoint_every == 0 or self.step == end or stop or out_of_time:
                        self._checkpoint()
                    if stop or out_of_time:
                        stopped_by = "signal" if stop else "time-limit"
                        break
                    if self.step >= end:
                        break
                epoch, skip = epoch + 1, 0
        if stopped_by == "iterations" and self.step < config.iterations:  # paused by stop_at (also when resumed at or past it)
            stopped_by = "stop-at"
        bar.close()
        if log is not None:
            log.close()
        return {"step": self.step, "stopped_by": stopped_by, "final_loss": self.last_loss}

    def _train_step(self, forward: torch.nn.Module, x0: torch.Tensor) -> None:
        """One optimiser step on a batch, then the EMA; a non-finite loss or an out-of-memory error stops the run, weights untouched."""
        config, device = self.config, self.device
        x0 = x0.to(device, non_blocking=True)
        if config.hflip:
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        if config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, config)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16):
                loss = self.diffusion.training_loss(forward, x0)
            if not torch.isfinite(loss.detach()):  # before the update: the weights stay those of the last good step
                raise TrainingStopped(f"pretrain {self.run_dir}: the loss became {float(loss.detach())} at step {self.step + 1}; stopped without "
                                      f"updating the weights; {_kept(self.run_dir)}; resume with --resume and a lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingStopped(out_of_memory_message(f"pretrain {self.run_dir}", self.step + 1, x0.shape[0], _kept(self.run_dir))) from e
        update_ema(self._ema_params, self._params, ema_decay_at(self.step, config))
        self.step += 1
        self.last_loss = float(loss.detach())
        started, images = self._window
        self._window = (started, images + x0.shape[0] * self.env.world_size)

    def _report(self, log: MetricsLog | None, bar: tqdm) -> None:
        """A metrics line every `log_every` steps and a preview grid every `sample_every`, on rank 0."""
        config, step = self.config, self.step
        if not self.env.main:
            return
        if step % config.log_every == 0 or step == config.iterations:
            started, images = self._window
            elapsed = time.monotonic() - started
            self.history["seconds"] += elapsed
            log.write({"step": step, "loss": self.last_loss, "lr": lr_at(step - 1, config), "images_per_s": images / elapsed, "time": time.time()})
            bar.set_postfix(loss=f"{self.last_loss:.4f}")
            self._window = (time.monotonic(), 0)
        if config.sample_every and step % config.sample_every == 0:
            save_sample_grid(self.ema, self.diffusion, self.run_dir / "samples" / f"step-{step:08d}.png", config.sample_count, config.sample_steps,
                             self.device)

    def _checkpoint(self) -> None:
        """Save on rank 0; every rank waits, so none runs ahead of a checkpoint."""
        if self.env.main:
            state = {"config": asdict(self.config), "unet": self.unet_config.to_dict(), "schedule": self.diffusion.to_dict(),
                     "data": str(self.data.resolve()), "preprocessing": self.dataset.index.spec.to_dict(), "history": self.history,
                     "final_loss": self.last_loss, "hardware": describe_hardware(self.device, self.env.world_size)}
            save_checkpoint(self.run_dir / "checkpoints", Checkpoint(self.step, self.model.state_dict(), self.ema.state_dict(),
                                                                     self.optimizer.state_dict(), state), self.config.keep_checkpoints)
        if self.env.world_size > 1:
            dist.barrier()


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
