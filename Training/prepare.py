"""`prepare`: CT files and DICOM folders -> the slice dataset, with the engine's exact preprocessing.

Resumable (volumes already in the index are skipped) and parallel; an unreadable or non-CT input is
recorded with its reason in the index and the report, and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from DiffusionSegLib.atomic import remove_leftovers, write_text
from DiffusionSegLib.dicom import dicom_series
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.imageio import LABELMAP_SUFFIXES, SEGMENTATION_SUFFIX, read_ct
from DiffusionSegLib.preprocessing import PreprocessingSpec, to_model_space

from .shards import INDEX_FILE, SliceIndex, read_index, write_index, write_shard

IMAGE_SUFFIXES = (*LABELMAP_SUFFIXES, ".nhdr")  # the engine's volume formats
DICOM_MARK = "#series="  # a source "folder#series=UID" is one DICOM series in a folder


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES) and not name.endswith(SEGMENTATION_SUFFIX)


def find_sources(inputs: Iterable[str | Path]) -> list[str]:
    """Image files and DICOM series (as 'folder#series=UID') under the inputs, sorted, without repeats."""
    sources: set[str] = set()
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if path.is_file():
            sources.add(str(path))
        elif path.is_dir():
            sources.update(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p))
            for uid, files in dicom_series(path).items():
                sources.add(f"{Path(files[0]).parent}{DICOM_MARK}{uid}")
        else:
            sources.add(str(path))  # reported as missing by the worker
    return sorted(sources)


def volume_id(source: str) -> str:
    """A stable file-name-safe id: readable stem + hash of the full source."""
    stem = Path(source.split(DICOM_MARK)[0]).name.replace(".nii.gz", "").split(".")[0][:40]
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def prepare_volume(source: str, spec: PreprocessingSpec, out_dir: Path) -> dict:
    """Preprocess one volume into its shard; returns its index entry (or raises InputError)."""
    path, _, uid = source.partition(DICOM_MARK)
    ct = read_ct(path, uid or None)
    volume = to_model_space(ct, spec)
    vid = volume_id(source)
    write_shard(out_dir / f"{vid}.npy", volume.slices)
    return {
        "id": vid,
        "source": source,
        "shard": f"{vid}.npy",
        "slices": volume.num_slices,
        "input_size": list(ct.GetSize()),
        "input_spacing": [round(s, 4) for s in ct.GetSpacing()],
        "clip_hu": list(volume.clip_hu),
    }


def _work(source: str, spec: PreprocessingSpec, out_dir: Path) -> tuple[str, dict | None, str | None]:
    try:
        return source, prepare_volume(source, spec, out_dir), None
    except InputError as e:
        return source, None, str(e)
    except Exception as e:  # noqa: BLE001 - one bad volume must never stop a day-long preparation
        return source, None, f"{type(e).__name__}: {e}"


def prepare(inputs: list[str], out_dir: str | Path, spec: PreprocessingSpec, workers: int = 1, show_progress: bool = True) -> SliceIndex:
    """Add every new source under `inputs` to the dataset in `out_dir`; returns the updated index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / INDEX_FILE).exists():
        index = read_index(out_dir)
        if index.spec != spec:
            raise InputError(f"{out_dir}: was prepared with {index.spec}, not {spec}; use a new output folder or the same --size/--spacing")
    else:
        index = SliceIndex(spec, [], [])
    done = {v["source"] for v in index.volumes}
    todo = [s for s in find_sources(inputs) if s not in done]
    index.skipped = [s for s in index.skipped if s["source"] not in todo]  # retried now
    remove_leftovers(out_dir)  # temporary shards of a run killed with -9
    bar = tqdm(total=len(todo), desc="prepare", unit="volume", disable=not show_progress)
    pool = ProcessPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(_work, source, spec, out_dir) for source in todo]
        for future in as_completed(futures):
            source, entry, reason = future.result()
            if entry is not None:
                index.volumes.append(entry)
            else:
                index.skipped.append({"source": source, "reason": reason})
                tqdm.write(f"skipped {source}: {reason}")
            index.volumes.sort(key=lambda v: v["source"])
            write_index(out_dir, index)  # after every volume, so an interrupted run resumes here
            bar.update()
    except BaseException:
        # Ctrl-C or SIGTERM: volumes not started are dropped, those being written finish (or, if their worker was killed too,
        # leave a temporary file removed here); the index lists complete shards only.
        pool.shutdown(wait=True, cancel_futures=True)
        remove_leftovers(out_dir)
        raise
    pool.shutdown()
    bar.close()
    write_index(out_dir, index)
    write_text(out_dir / "report.json", json.dumps({"volumes": len(index.volumes), "slices": index.num_slices, "skipped": index.skipped}, indent=1) + "\n")
    return index
