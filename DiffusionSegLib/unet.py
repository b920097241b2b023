"""ADM-style U-Net noise predictor (the architecture of guided-diffusion's 256x256 models).

Sinusoidal timestep embedding + MLP; ResBlocks with GroupNorm/SiLU and scale-shift norm; resblock
up/down-sampling; multi-head self-attention at chosen resolutions; skip connections from every
encoder block. The encoder (`input_blocks`), bottleneck (`middle_block`) and decoder
(`output_blocks`) are separate attributes so fine-tuning strategies can freeze them separately, and
`encode`/`decode` are separate so a frozen encoder's activations can be computed once and reused.

Parameter counts with 1 input and 1 output channel: U-Net-L 552.8M, U-Net-B 138.3M, small 8.67M,
tiny 1.37M (see `count_parameters`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 256
    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # pixel resolutions with self-attention (ds = image_size // res)
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True

    def __post_init__(self) -> None:
        # Lists (e.g. from JSON) become tuples so configs stay hashable and compare equal.
        for name in ("channel_mult", "attention_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks", "num_head_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"U-Net config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"U-Net config: channel_mult must be a non-empty list of positive integers, got {list(self.channel_mult)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"U-Net config: dropout must lie in [0, 1), got {self.dropout}")
        levels = len(self.channel_mult)
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ValueError(f"U-Net config: image_size {self.image_size} must be divisible by {factor} (2**(levels-1) for {levels} levels)")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"U-Net config: {self.model_channels * mult} channels (model_channels {self.model_channels} x {mult}) "
                    f"are not divisible by norm_groups {self.norm_groups}"
                )
        level_of = {self.image_size // 2**level: level for level in range(levels)}
        for resolution in self.attention_resolutions:
            if resolution not in level_of:
                raise ValueError(f"U-Net config: attention resolution {resolution} is not one of the U-Net's resolutions {sorted(level_of, reverse=True)}")
        # Attention at the listed levels, plus always in the middle block (deepest level).
        for level in {level_of[r] for r in self.attention_resolutions} | {levels - 1}:
            channels = self.model_channels * self.channel_mult[level]
            if channels % self.num_head_channels:
                raise ValueError(f"U-Net config: {channels} attention channels are not divisible by num_head_channels {self.num_head_channels}")

    @property
    def attention_downsample(self) -> set[int]:
        """Downsample factors (1 = full resolution) at which self-attention is used."""
        return {self.image_size // r for r in self.attention_resolutions}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_ADM_256 = dict(channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(32, 16, 8), num_head_channels=64)
PRESETS: dict[str, UNetConfig] = {
    "l": UNetConfig(model_channels=256, **_ADM_256),  # U-Net-L, ~553M parameters
    "b": UNetConfig(model_channels=128, **_ADM_256),  # U-Net-B, ~138M
    "small": UNetConfig(model_channels=32, **_ADM_256),  # ~8.7M, CPU-friendly
    "tiny": UNetConfig(  # ~1.4M, for fast tests
        image_size=64, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16,), num_head_channels=32
    ),
}


def preset_config(name: str, image_size: int | None = None) -> UNetConfig:
    """A preset, optionally at another image size with attention kept at the same downsample factors."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]
    if image_size is None or image_size == config.image_size:
        return config
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    resolutions = tuple(image_size // ds for ds in sorted(config.attention_downsample))
    return replace(config, image_size=image_size, attention_resolutions=resolutions)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings (B x dim, float32) of integer or fractional timesteps: [cos | sin] as in ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype: its statistics are unstable in half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block that takes the timestep embedding as a second input."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the timestep embedding to the layers that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Strided 3x3 conv (used when resblock_updown is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (used when resblock_updown is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv twice, conditioned on the timestep (scale-shift norm); optional up/down-sampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        groups: int = 32,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = "up" if up else "down" if down else None
        self.in_norm = GroupNorm32(groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_norm = GroupNorm32(groups, out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        # Resample after the norm/activation and before the conv, on both paths, as ADM does.
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, with a residual connection.

    The qkv channels are laid out as [q | k | v], each head-major (ADM's `QKVAttention`, the
    "new attention order"); the scale 1/sqrt(head_channels) is scaled_dot_product_attention's default.
    """

    def __init__(self, channels: int, num_head_channels: int = 64, groups: int = 32) -> None:
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))  # B x 3C x L
        # B x L x 3 x heads x d, then 3 x B x heads x L x d: head channels last and contiguous, as fused kernels want.
        q, k, v = qkv.transpose(1, 2).reshape(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # B x heads x L x d
        h = h.permute(0, 1, 3, 2).reshape(b, c, -1)
        return x + self.proj_out(h).reshape(b, c, height, width)


class UNetModel(nn.Module):
    """The noise predictor eps(x_t, t). `use_checkpoint` trades compute for activation memory in training."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.use_checkpoint = False
        ch = config.model_channels
        emb = 4 * ch
        groups = config.norm_groups
        attention_ds = config.attention_downsample

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb, cout, config.dropout, config.use_scale_shift_norm, groups, **kw)

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, config.num_head_channels, groups)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        channels, ds = ch, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(channels, mult * ch)]
                channels = mult * ch
                if ds in attention_ds:
                    layers.append(attention(channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(config.channel_mult) - 1:
                down = res(channels, channels, down=True) if config.resblock_updown else Downsample(channels)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(channels)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(channels, channels), attention(channels), res(channels, channels))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res(channels + skip_channels.pop(), mult * ch)]
                channels = mult * ch
                if ds in attention_ds:
                    layers.append(attention(channels))
                if level and i == config.num_res_blocks:
                    layers.append(res(channels, channels, up=True) if config.resblock_updown else Upsample(channels))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.feature_channels: int = channels  # = model_channels * channel_mult[0], what enters `out`
        self.out = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(), zero_module(nn.Conv2d(channels, config.out_channels, 3, padding=1)))

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            # Recompute the block in backward instead of storing its activations; RNG (dropout) is replayed.
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def encode_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The time embedding every ResBlock receives, one row per timestep."""
        # The embedding MLP runs in its own weights' dtype (float32 unless the model was cast), as in ADM.
        return self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.time_embed[0].weight.dtype))

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Skip activations of every input block, the middle-block output, and the time embedding."""
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.encode_time(timesteps)
        hs = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            hs.append(h)
        return hs, self._run(self.middle_block, h, emb), emb

    def decode(self, hs: list[torch.Tensor], h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Decoder features before the output layer; `hs` is left as it was (it may be a cache)."""
        skips = list(hs)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.out(self.decode(*self.encode(x, timesteps)))
