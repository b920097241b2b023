"""ADM-style U-Net noise predictor (the architecture of guided-diffusion's 256x256 models).

Sinusoidal timestep embedding + MLP; ResBlocks with GroupNorm/SiLU and scale-shift norm; resblock
up/down-sampling; multi-head self-attention at chosen resolutions; skip connections from every
encoder block. The encoder (`input_blocks`), bottleneck (`middle_block`) and decoder
(`output_blocks`) are separate attributes so fine-tuning strategies can freeze them separately, and
`encode`/`decode` are separate so a frozen encoder's activations can be computed once and reused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

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
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # pixel resolutions with self-attention
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by {2 ** (levels - 1)} for {levels} levels")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(f"{self.model_channels * mult} channels are not divisible by norm_groups {self.norm_groups}")
        for level, mult in enumerate(self.channel_mult):
            if self.image_size // 2**level in self.attention_resolutions and (self.model_channels * mult) % self.num_head_channels:
                raise ValueError(f"{self.model_channels * mult} attention channels are not divisible by num_head_channels {self.num_head_channels}")

    @property
    def attention_downsample(self) -> set[int]:
        return {self.image_size // r for r in self.attention_resolutions}

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_ADM = dict(channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(32, 16, 8), num_head_channels=64)
PRESETS: dict[str, UNetConfig] = {
    "l": UNetConfig(model_channels=256, **_ADM),  # U-Net-L
    "b": UNetConfig(model_channels=128, **_ADM),  # U-Net-B
    "small": UNetConfig(model_channels=32, **_ADM),  # CPU-friendly
    "tiny": UNetConfig(
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
    resolutions = tuple(image_size // ds for ds in sorted(config.attention_downsample))
    return replace(config, image_size=image_size, attention_resolutions=resolutions)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings (B x dim) of integer or fractional timesteps, as in Transformers and ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in float32 whatever the autocast dtype: the statistics are unstable in half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block that takes the timestep embedding as a second input."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv twice, conditioned on the timestep by scale-shift norm; optional up/down."""

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
        self.in_norm = GroupNorm32(groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample = "up" if up else "down" if down else None
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
    """Multi-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, num_head_channels: int = 64, groups: int = 32) -> None:
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))  # B x 3C x HW
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, -1).permute(1, 0, 2, 4, 3)  # each B x heads x HW x d
        h = F.scaled_dot_product_attention(q, k, v)  # B x heads x HW x d
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

        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        channels, ds = ch, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(channels, mult * ch)]
                channels = mult * ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(channels, config.num_head_channels, groups))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(config.channel_mult) - 1:
                down = res(channels, channels, down=True) if config.resblock_updown else Downsample(channels)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(channels)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res(channels, channels), AttentionBlock(channels, config.num_head_channels, groups), res(channels, channels)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res(channels + skip_channels.pop(), mult * ch)]
                channels = mult * ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(channels, config.num_head_channels, groups))
                if level and i == config.num_res_blocks:
                    layers.append(res(channels, channels, up=True) if config.resblock_updown else Upsample(channels))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.feature_channels = channels
        self.out = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(), zero_module(nn.Conv2d(channels, config.out_channels, 3, padding=1)))

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Skip activations of every input block, the middle-block output, and the time embedding."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
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
