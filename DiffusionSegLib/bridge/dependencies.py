"""The Python packages the engine needs inside 3D Slicer, which of them are missing, and when a restart is due.

Slicer ships numpy, SimpleITK and requests with its own builds; replacing them breaks other modules, so
they are never installed or upgraded: they are pinned in a pip constraints file for every install. torch
comes from the PyTorch extension (a CUDA build matched to the driver), not from here.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

# distribution name, minimum version: the engine's runtime dependencies (pyproject.toml) except the three below
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("safetensors", "0.4"),
    ("slicerio", "1.1"),
    ("tqdm", "4.60"),
    ("platformdirs", "3"),
    ("scikit-image", "0.21"),
    ("scipy", "1.8"),
    ("Pillow", "9"),
)
TORCH_MINIMUM = "2.2"
PROTECTED = ("numpy", "SimpleITK", "requests")  # Slicer's own; pinned, never replaced


@dataclass(frozen=True)
class Missing:
    name: str
    minimum: str
    installed: str | None  # None: not installed; else an older version

    @property
    def requirement(self) -> str:
        return f"{self.name}>={self.minimum}"

    def describe(self) -> str:
        return self.requirement if self.installed is None else f"{self.requirement} (installed: {self.installed})"


def _version_key(version: str) -> tuple[int, ...]:
    """Numeric release parts, enough to compare against our plain minimums (``2.3.0rc1`` -> (2, 3, 0))."""
    parts = []
    for piece in version.split(".")[:4]:
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def at_least(installed: str, minimum: str) -> bool:
    a, b = _version_key(installed), _version_key(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(
    requirements: Iterable[tuple[str, str]] = REQUIREMENTS, version_of: Callable[[str], str | None] = installed_version
) -> list[Missing]:
    """The requirements that are not installed or too old."""
    missing = []
    for name, minimum in requirements:
        version = version_of(name)
        if version is None or not at_least(version, minimum):
            missing.append(Missing(name, minimum, version))
    return missing


def torch_missing(version_of: Callable[[str], str | None] = installed_version) -> Missing | None:
    found = missing_requirements([("torch", TORCH_MINIMUM)], version_of)
    return found[0] if found else None


def constraints(version_of: Callable[[str], str | None] = installed_version) -> str:
    """pip constraints text pinning the installed versions of Slicer's own packages."""
    lines = []
    for name in PROTECTED:
        version = version_of(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + ("\n" if lines else "")


# Distribution name -> the module it is imported as, to tell whether an upgraded package is already loaded.
IMPORT_NAMES = {"scikit-image": "skimage", "pyyaml": "yaml", "Pillow": "PIL"}


def import_name(distribution: str) -> str:
    return IMPORT_NAMES.get(distribution, distribution)


def loaded_upgrades(missing: Iterable[Missing], loaded_modules: Collection[str]) -> list[Missing]:
    """The `missing` packages that are installed in an older version and already imported in this session.

    Upgrading them on disk leaves the old version in memory (mixed with new files imported later) until
    Slicer restarts, so the module asks for a restart after installing them.
    """
    return [m for m in missing if m.installed is not None and import_name(m.name) in loaded_modules]
