"""One patient's patch coordinates: tile every slide, then write all outputs (no Dagster).

Outputs in the patient's folder (`<artifacts>/patch_coords/<pid>/`, or `ln_patch_coords/<pid>/`
for the lymph-node slides: the same tiling and files, see slide_sets.py):

* `<slide_stem>.h5` per slide with at least one patch (CLAM layout, see `coords_h5.py`);
* `slides.json`: every slide of the patient, with its fingerprint, resolution
  and source, patch count and HDF5 file (null when the slide has no patch,
  with the reason). Downstream assets read this listing, not the folder. A
  DICOM-WSI series is one entry: `source_files` lists all its files and
  `dicom` the instances tiled (VOLUME) and those ignored, with the reason.
* `tiling.png`: the picture shown in the Dagster UI.

Every slide is opened and tiled before anything is written, so a bad slide
leaves the folder as it was; each file is written under a temporary name and
renamed, and `slides.json` is written after the HDF5 files it lists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.catalogue import SLIDE_LISTING, TILING_PICTURE, AssetFile
from gcmlm_assets.pathology.coords_h5 import write_coords_h5
from gcmlm_assets.pathology.slides import SlideError, SlideInfo, SlideSource, opened, slide_source
from gcmlm_assets.pathology.tiling import tile_slide
from gcmlm_assets.pathology.tiling_params import TILING_VERSION, TilingParams, TilingResult
from gcmlm_assets.pathology.tiling_picture import tiling_picture
from gcmlm_assets.pictures import save_png
from gcmlm_assets.storage import atomic_write_json, sha256_file, sha256_text


@dataclass
class SlideOutcome:
    path: Path
    info: SlideInfo | None
    result: TilingResult | None
    error: str | None
    seconds: float


def _sources(slides: list[SlideSource | Path]) -> list[SlideSource]:
    return [s if isinstance(s, SlideSource) else slide_source(s) for s in slides]


def inputs_fingerprint(slides: list[SlideSource | Path], params: TilingParams) -> str:
    """What the outputs are made from: the code version, the parameters, and the name, size and
    modification time of every file of every slide, all files of a DICOM series included (hashing
    GBs of pixels would cost more than tiling them)."""
    parts = [f"tiling={TILING_VERSION}", json.dumps(params.as_dict(), sort_keys=True, default=str)]
    for source in _sources(slides):
        parts.append(f"slide {source.path.name}")
        parts.extend(f"{f['file']}|{f['size_bytes']}|{f['mtime_ns']}" for f in source.file_stats())
    return sha256_text(*parts)


def tile_patient(slides: list[SlideSource | Path], params: TilingParams) -> list[SlideOutcome]:
    """Open and tile every slide; a slide that cannot be used gets its error, the others go on."""
    outcomes = []
    for source in _sources(slides):
        path = source.path
        started = time.perf_counter()
        try:
            with opened(source, default_mpp=params.default_mpp, plausible_mpp=params.plausible_mpp) as slide:
                result = tile_slide(slide, params)
            outcomes.append(SlideOutcome(path, slide.info, result, None, time.perf_counter() - started))
        except SlideError as error:
            outcomes.append(SlideOutcome(path, None, None, str(error), time.perf_counter() - started))
        except Exception as error:  # noqa: BLE001 - still name the slide that broke, with the error's type
            problem = f"{path.name}: tiling failed with {type(error).__name__}: {error} ({path})"
            outcomes.append(SlideOutcome(path, None, None, problem, time.perf_counter() - started))
    return outcomes


def slide_entry(outcome: SlideOutcome, h5_path: Path | None, h5_sha256: str | None) -> dict:
    info, result = outcome.info, outcome.result
    assert info is not None and result is not None
    attrs = result.attrs
    return {
        "file": info.path.name,
        "name": info.name,
        "slide_path": str(info.path),
        "size_bytes": info.size_bytes,
        "mtime_ns": info.mtime_ns,
        "quickhash1": info.quickhash,
        "source_files": list(info.files),
        "dicom": info.dicom,
        "vendor": info.vendor,
        "dimensions": list(info.dimensions),
        "n_levels": len(info.level_dimensions),
        "mpp": [info.mpp.x, info.mpp.y],
        "mpp_source": info.mpp.source,
        "mpp_detail": info.mpp.detail,
        "n_patches": result.n_patches,
        "n_candidates": result.n_candidates,
        "tissue_fraction": round(result.tissue_fraction, 6),
        "reason": result.reason,
        "patch_size": int(attrs["target_patch_size"]),  # output px (attrs["patch_size"] is the read size)
        "patch_level": int(attrs["patch_level"]),
        "read_size": int(attrs["read_size"]),
        "patch_size_level0": int(attrs["patch_size_level0"]),
        "target_mpp": float(attrs["target_mpp"]),
        "achieved_mpp": float(attrs["achieved_mpp"]),
        "h5": str(h5_path) if h5_path else None,
        "h5_file": h5_path.name if h5_path else None,
        "h5_sha256": h5_sha256,
    }


def write_patient_outputs(out_dir: Path, patient_id: str, outcomes: list[SlideOutcome], params: TilingParams,
                          *, listing: AssetFile = SLIDE_LISTING, picture: AssetFile = TILING_PICTURE) -> dict:
    """Write the HDF5 files, the picture and `slides.json` (`listing` and `picture`: the files of the
    asset written, patch_coords' or ln_patch_coords'); drop HDF5 files of slides that are gone.
    Returns the listing (as written) with `files`: {name: sha256}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, files = [], {}
    for outcome in outcomes:
        result = outcome.result
        assert result is not None, "write only after every slide tiled"
        h5_path, digest = None, None
        if result.n_patches:
            h5_path = write_coords_h5(out_dir / f"{result.name}.h5", result)
            digest = sha256_file(h5_path)
            files[h5_path.name] = digest
        entries.append(slide_entry(outcome, h5_path, digest))
    picture_path = save_png(tiling_picture([o.result for o in outcomes if o.result]), picture.in_folder(out_dir))
    files[picture.name] = sha256_file(picture_path)
    written = {
        "patient_id": patient_id,
        "tiling_version": TILING_VERSION,
        "params": params.as_dict(),
        "n_slides": len(entries),
        "n_patches": sum(e["n_patches"] for e in entries),
        "slides": entries,
    }
    listing_path = atomic_write_json(listing.in_folder(out_dir), written)
    files[listing.name] = sha256_file(listing_path)
    for stale in out_dir.glob("*.h5"):
        if stale.name not in files:
            stale.unlink(missing_ok=True)
    return {**written, "files": files}


def read_listing(out_dir: Path, listing: AssetFile = SLIDE_LISTING) -> dict:
    return json.loads(listing.in_folder(out_dir).read_text(encoding="utf-8"))


def output_version(listing: dict) -> str:
    """Content version of the outputs: the HDF5 files' hashes (not the slides' mtimes)."""
    parts = sorted(f"{e['h5_file']}:{e['h5_sha256']}:{e['n_patches']}" for e in listing["slides"])
    return sha256_text(TILING_VERSION, *parts)
