"""The segmentor: a pretrained noise-predicting U-Net whose output layer is replaced by a class head.

The U-Net is fed a fixed diffusion timestep (t=0 by default: the clean image is what we segment, and
the method found t=0 best). A fine-tuning strategy (``strategies.py``: ft-dec, lp, fs, ...) decides
which of the three parts learn: encoder, decoder, head.

What counts as the encoder: the time-embedding MLP, the input blocks and the middle block. The time
MLP feeds every ResBlock of the encoder, so training it would change encoder features; with t fixed it
only ever sees one input, so freezing it loses nothing. The middle block sits before the first skip
connection is merged, i.e. it is the bottleneck of the encoding path, and freezing it makes the whole
encoder output (skips + bottleneck) a fixed function of the image, which lets fine-tuning skip its
gradients entirely and cache it. The decoder's ResBlocks keep their own (trainable) projections of the
fixed time embedding.

The frozen parts always lead the forward pass, so fine-tuning splits it in two: `frozen_features`
(without autograd, or from a cache) and `trainable_logits`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import strategies
from .organs import FLARE22
from .strategies import DEFAULT_HEAD_LAYERS, PARTS
from .strategies import STRATEGIES as STRATEGIES  # re-exported: the offered strategies, for callers that hold a segmentor
from .unet import UNetConfig, UNetModel

# Hidden width of the head per preset: h128 for U-Net-B, h256 for U-Net-L, smaller for the CPU presets.
DEFAULT_HEAD_WIDTH = {"b": 128, "l": 256, "small": 64, "tiny": 32}


class SegmentationHead(nn.Module):
    """Conv3x3 + GroupNorm + SiLU layers, then a 1x1 conv to the class logits.

    Unlike ADM's output layer the final conv is not zero-initialised: a zero head would give every
    class the same logit and the same gradient to every upstream unit at the first step.
    """

    def __init__(self, in_channels: int, hidden: int, num_classes: int = FLARE22.num_classes, layers: int = DEFAULT_HEAD_LAYERS) -> None:
        super().__init__()
        groups = 32 if hidden % 32 == 0 else 8 if hidden % 8 == 0 else 1
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(layers):
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU()]
            channels = hidden
        blocks.append(nn.Conv2d(channels, num_classes, 1))
        self.layers = nn.Sequential(*blocks)
        self.hidden = hidden
        self.num_layers = layers

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    @torch.no_grad()
    def set_class_prior(self, frequencies: torch.Tensor, floor: float = 1e-4) -> None:
        """Set the class biases to log(frequency): before training, the head predicts the label prior.

        Classes rarer than `floor` (absent from the training labels) get log(floor), not minus infinity.
        """
        out = self.layers[-1]
        if frequencies.shape != out.bias.shape:
            raise ValueError(f"{frequencies.numel()} class frequencies for a head with {out.bias.numel()} classes")
        out.bias.copy_(frequencies.to(out.bias).clamp(min=floor).log())


class Segmentor(nn.Module):
    """U-Net backbone (without its noise output layer) + segmentation head, at a fixed timestep."""

    def __init__(
        self,
        unet_config: UNetConfig,
        head_width: int,
        head_layers: int = DEFAULT_HEAD_LAYERS,
        timestep: int = 0,
        num_classes: int = FLARE22.num_classes,
    ) -> None:
        super().__init__()
        self.unet = UNetModel(unet_config)
        del self.unet.out  # the noise output layer is replaced, not kept unused
        self.head = SegmentationHead(self.unet.feature_channels, head_width, num_classes, head_layers)
        self.timestep = int(timestep)
        self.num_classes = num_classes

    def encoder_modules(self) -> list[nn.Module]:
        return [self.unet.time_embed, self.unet.input_blocks, self.unet.middle_block]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.unet.output_blocks]

    def timesteps(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return self.unet.encode(x, self.timesteps(x))

    def decode(self, hs: list[torch.Tensor], h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet.decode(hs, h, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B x C x H x W) for images (B x 1 x H x W) in [-1, 1]."""
        return self.decode(*self.encode(x))

    def load_pretrained(self, unet_state: dict[str, torch.Tensor]) -> None:
        """Copy a pretrained noise predictor's weights into the backbone, dropping its output layer."""
        backbone = {k: v for k, v in unet_state.items() if not k.startswith("out.")}
        try:
            missing, unexpected = self.unet.load_state_dict(backbone, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when not strict
            raise ValueError(f"pretrained weights do not fit the backbone: {str(e).splitlines()[0]}") from e
        if missing or unexpected:
            raise ValueError(
                f"pretrained weights do not fit the backbone: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )

    def part_modules(self, part: str) -> list[nn.Module]:
        """The modules of one of `strategies.PARTS`."""
        return {"encoder": self.encoder_modules, "decoder": self.decoder_modules, "head": lambda: [self.head]}[part]()

    def configure_strategy(self, strategy: str) -> None:
        """Set requires_grad for `strategy` (``strategies.py``): the parts it trains learn, the others not."""
        self.set_trainable(strategies.get(strategy).trains)

    def set_trainable(self, parts: tuple[str, ...]) -> None:
        self.requires_grad_(False)
        for part in parts:
            for module in self.part_modules(part):
                module.requires_grad_(True)

    def trainable_parts(self) -> tuple[str, ...]:
        """The parts with any parameter that learns, in forward order."""
        return tuple(p for p in PARTS if any(q.requires_grad for m in self.part_modules(p) for q in m.parameters()))

    def frozen_parts(self) -> tuple[str, ...]:
        """The parts before the first one that learns: the start of the forward pass that needs no autograd."""
        trainable = self.trainable_parts()
        return PARTS[: PARTS.index(trainable[0])] if trainable else PARTS

    def frozen_modules(self) -> list[nn.Module]:
        return [m for part in self.frozen_parts() for m in self.part_modules(part)]

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What the frozen parts make of images `x`, per slice (batch first); run it without autograd.

        Nothing frozen: `x` itself. Encoder frozen: its skip activations and the middle block's output.
        Encoder and decoder frozen: the decoder features.
        """
        frozen = self.frozen_parts()
        if not frozen:
            return [x]
        hs, h, emb = self.encode(x)
        return [*hs, h] if frozen == ("encoder",) else [self.unet.decode(hs, h, emb)]

    def trainable_logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Class logits from `frozen_features` through the parts that learn."""
        frozen = self.frozen_parts()
        if not frozen:
            return self(features[0])
        if frozen == ("encoder",):
            with torch.no_grad():  # the time embedding belongs to the frozen encoder
                emb = self.unet.encode_time(self.timesteps(features[0]))
            return self.decode(features[:-1], features[-1], emb)
        return self.head(features[0])

    def parameter_groups(self, lr: float, weight_decay: float, head_lr_factor: float, head_weight_decay: float) -> list[dict]:
        """Adam parameter groups: the head learns `head_lr_factor` times faster with its own weight decay."""
        backbone = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [{"params": list(self.head.parameters()), "lr": lr * head_lr_factor, "weight_decay": head_weight_decay, "name": "head"}]
        if backbone:
            groups.append({"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"})
        return groups
