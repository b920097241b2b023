"""The on-disk slice dataset: one float16 .npy shard per CT volume plus an index, read memory-mapped.

207k slices of 256 x 256 are 27 GB in float16: training maps shards lazily and never loads them all.
Model-space values lie in [-1, 1], where float16's 11-bit mantissa (~5e-4 resolution near 1) is far
below the CT noise, so nothing the network could learn is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from DiffusionSegLib.atomic import atomic_path, write_text
from DiffusionSegLib.preprocessing import PreprocessingSpec

INDEX_FILE = "index.json"
FORMAT_VERSION = 1


@dataclass
class SliceIndex:
    """What `prepare` wrote: the preprocessing, one entry per volume, and what was skipped and why."""

    spec: PreprocessingSpec
    volumes: list[dict]
    skipped: list[dict]

    @property
    def num_slices(self) -> int:
        return sum(v["slices"] for v in self.volumes)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "preprocessing": self.spec.to_dict(),
            "num_slices": self.num_slices,
            "volumes": self.volumes,
            "skipped": self.skipped,
        }


def read_index(folder: str | Path) -> SliceIndex:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {INDEX_FILE}; create the slice dataset with 'diffusionseg-train prepare'")
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported slice dataset format {d.get('format_version')!r}")
    return SliceIndex(PreprocessingSpec.from_dict(d["preprocessing"]), d["volumes"], d.get("skipped", []))


def write_index(folder: str | Path, index: SliceIndex) -> None:
    """Atomic: a crash while writing leaves the previous index."""
    write_text(Path(folder) / INDEX_FILE, json.dumps(index.to_dict(), indent=1) + "\n")


def write_shard(path: Path, slices: np.ndarray) -> None:
    """Write N x S x S slices as float16 atomically (the index only lists shards that are complete)."""
    with atomic_path(path) as tmp:
        np.save(tmp, slices.astype(np.float16))


class SliceDataset(Dataset):
    """Every slice of every shard, as 1 x S x S float32 tensors in [-1, 1]."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.shards = [v["shard"] for v in self.index.volumes]
        self.ends = np.cumsum([v["slices"] for v in self.index.volumes])
        self._maps: dict[int, np.ndarray] = {}  # opened per worker process, on first use

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._maps:
            self._maps[number] = np.load(self.folder / self.shards[number], mmap_mode="r")
        return self._maps[number]

    def __getitem__(self, i: int) -> torch.Tensor:
        number = int(np.searchsorted(self.ends, i, side="right"))
        start = int(self.ends[number - 1]) if number else 0
        return torch.from_numpy(np.asarray(self._shard(number)[i - start], dtype=np.float32))[None]

    def __getstate__(self) -> dict:  # memory maps are reopened in each DataLoader worker
        return {**self.__dict__, "_maps": {}}
