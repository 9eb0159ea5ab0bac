"""DICOM-WSI series built from the real CMU-1 region: grouped into one slide, tiled from VOLUME only, read by OpenSlide."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest

from gcmlm_assets.pathology.assets import patch_coords, uni_features
from gcmlm_assets.pathology.encoders import load_encoder
from gcmlm_assets.pathology.extract import slide_fingerprint
from gcmlm_assets.pathology.patch_coords import inputs_fingerprint, slide_entry, tile_patient
from gcmlm_assets.pathology.resources import PatchEncoder, TilingSettings
from gcmlm_assets.pathology.slides import MPP_FROM_DEFAULT, MPP_FROM_OPENSLIDE, SlideError, list_slides, opened
from gcmlm_assets.pathology.tiling import tile_slide
from gcmlm_assets.pathology.tiling_params import TilingParams

from gcmlm_assets_tests.support.pathology.dicom_wsi_fixtures import write_ct_slice, write_dicom_wsi
from gcmlm_assets_tests.support.pathology.features import (
    cosine_rows, materialize_patient, metadata_of, reference_features,
)
from gcmlm_assets_tests.support.pathology.slide_fixtures import copy_into, real_slide, real_tissue_rgb


@pytest.fixture(scope="module")
def tissue(test_data: Path) -> np.ndarray:
    return real_tissue_rgb(test_data)


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory, tissue):
    """A folder with one series (2 VOLUME levels, THUMBNAIL, LABEL) beside the SVS it was made from."""
    folder = tmp_path_factory.mktemp("dicom") / "wsi"
    built = write_dicom_wsi(folder, tissue, stem="cmu1")
    return folder, built


def test_a_series_is_one_slide_whose_label_and_thumbnail_are_named_as_ignored(series_dir, test_data):
    folder, built = series_dir
    svs = copy_into(real_slide(test_data), folder)
    try:
        slides = list_slides(folder)
    finally:
        svs.unlink()
    assert [s.path.name for s in slides] == ["cmu-1-small-region.svs", "cmu1-level0.dcm"]
    series = slides[1]
    assert set(series.files) == set(built.files) and series.name == "cmu1-level0"

    # OpenSlide opens the whole series from any of its files, the label's included.
    for path in built.files:
        with openslide.OpenSlide(str(path)) as handle:
            assert handle.level_dimensions == ((2220, 2967), (555, 742))
            assert sorted(handle.associated_images) == ["label", "thumbnail"]

    with opened(built.label, default_mpp=0.5) as slide:  # named by its label: still the series, from level 0
        info = slide.info
    assert info.path == built.volumes[0] and info.vendor == "dicom" and info.name == "cmu1-level0"
    assert info.size_bytes == sum(p.stat().st_size for p in built.files)
    assert {f["file"] for f in info.files} == {p.name for p in built.files}
    assert info.dicom["opened_file"] == "cmu1-level0.dcm"
    assert [v["file"] for v in info.dicom["volume_instances"]] == ["cmu1-level0.dcm", "cmu1-level1.dcm"]
    ignored = {i["file"]: i["reason"] for i in info.dicom["ignored_instances"]}
    assert set(ignored) == {"cmu1-label.dcm", "cmu1-thumbnail.dcm"}
    assert "label" in ignored["cmu1-label.dcm"] and "not tissue" in ignored["cmu1-label.dcm"]
    assert "VOLUME pyramid" in ignored["cmu1-thumbnail.dcm"]
    # µm/px from PixelSpacing (mm) of the shared functional groups, as the SVS records it.
    assert (info.mpp.x, info.mpp.y, info.mpp.source) == (pytest.approx(0.499), pytest.approx(0.499),
                                                          MPP_FROM_OPENSLIDE)
    assert "PixelSpacing" in info.mpp.detail and "cmu1-level0.dcm" in info.mpp.detail


def test_levels_are_chosen_by_image_flavour_as_openslide_chooses_them(tmp_path, tissue):
    # OpenSlide goes by ImageType value 3 alone: an unusual value 1, 2 or 4 still makes a level.
    write_dicom_wsi(tmp_path, tissue[:512, :512], stem="o", downsamples=(1, 2), label=False, thumbnail=False,
                    volume_types=(("ORIGINAL", "PRIMARY", "VOLUME", "NONE"),
                                  ("DERIVED", "SECONDARY", "VOLUME", "UNUSUAL")))
    [source] = list_slides(tmp_path)
    with opened(source, default_mpp=0.5) as slide:
        levels = slide.info.level_dimensions
        volumes = slide.info.dicom["volume_instances"]
    assert levels == ((512, 512), (256, 256))
    assert [(v["width"], v["height"]) for v in volumes] == list(levels)
    assert volumes[1]["image_type"] == "DERIVED\\SECONDARY\\VOLUME\\UNUSUAL"


def test_two_series_in_one_folder_are_two_slides(tmp_path, tissue):
    a = write_dicom_wsi(tmp_path, tissue[:1024, :1024], stem="a", thumbnail=False)
    b = write_dicom_wsi(tmp_path, tissue[:768, :512], stem="b", label=False)
    slides = list_slides(tmp_path)
    assert [(s.path, set(s.files)) for s in slides] == [(a.volumes[0], set(a.files)), (b.volumes[0], set(b.files))]
    with opened(slides[0], default_mpp=0.5) as first, opened(slides[1], default_mpp=0.5) as second:
        assert first.info.dimensions == (1024, 1024) and second.info.dimensions == (512, 768)
        assert first.info.associated_images == ("label",) and second.info.associated_images == ("thumbnail",)


def test_dicom_files_that_are_not_a_usable_slide_are_refused_by_name(tmp_path, tissue):
    small = tissue[:512, :512]
    write_dicom_wsi(tmp_path / "ct", small, stem="s")
    write_ct_slice(tmp_path / "ct" / "stray-ct.dcm")
    with pytest.raises(SlideError, match=r"stray-ct\.dcm: is a DICOM CT Image Storage instance .* not a whole-slide"):
        list_slides(tmp_path / "ct")

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.dcm").write_text("not a slide at all, just words " * 20)
    with pytest.raises(SlideError, match=r"notes\.dcm: not a DICOM file"):
        list_slides(tmp_path / "text")

    only_label = write_dicom_wsi(tmp_path / "label", small, stem="l", downsamples=())
    with pytest.raises(SlideError, match=r"has no VOLUME instance, only l-label\.dcm \(LABEL\), l-thumbnail"):
        list_slides(tmp_path / "label")
    assert only_label.label is not None



@pytest.mark.parametrize("mpp, level, read_size, source", [
    (0.499, 0, 256, MPP_FROM_OPENSLIDE),  # 20x: level 0 read as it is
    (0.125, 1, 256, MPP_FROM_OPENSLIDE),  # "80x": level 1 (downsample 4) is 0.5 µm/px
    (0.25, 0, 512, MPP_FROM_OPENSLIDE),  # 40x: level 1 would be 1 µm/px, too coarse; 512 px of level 0
    (None, 0, 256, MPP_FROM_DEFAULT),  # no PixelSpacing: the default, reported as such
])
def test_pixel_spacing_sets_the_patch_grid(tmp_path, tissue, mpp, level, read_size, source):
    built = write_dicom_wsi(tmp_path, tissue, stem="s", mpp=mpp, label=False, thumbnail=False)
    with opened(built.volumes[0], default_mpp=0.5) as slide:
        result = tile_slide(slide, TilingParams())
    attrs = result.attrs
    assert attrs["mpp_source"] == source and attrs["level0_mpp"] == pytest.approx(mpp or 0.5)
    assert (int(attrs["patch_level"]), int(attrs["read_size"])) == (level, read_size)
    # The grid step is 256 px x 0.5 µm/px = 128 µm of tissue whatever the scan's resolution.
    assert int(attrs["patch_size_level0"]) * (mpp or 0.5) == pytest.approx(128, rel=0.01)
    assert attrs["achieved_mpp"] == pytest.approx(0.5, rel=0.01) and result.n_patches > 0
    # Patches lie on that grid (level-0 px, from the slide's corner).
    fov = result.patch_size_level0
    assert np.abs(result.coords - np.round(result.coords / fov) * fov).max() <= 1


def test_the_fingerprint_covers_every_file_of_the_series(tmp_path, tissue):
    built = write_dicom_wsi(tmp_path, tissue[:1024, :1024], stem="f")
    params = TilingParams()
    [outcome] = tile_patient(list_slides(tmp_path), params)
    entry = slide_entry(outcome, None, None)
    before = (inputs_fingerprint(list_slides(tmp_path), params), slide_fingerprint(entry))
    # The label re-exported (a file OpenSlide is not given, with the same Series UID): OpenSlide's
    # quickhash of a series is its UID alone and stays; both fingerprints change.
    write_dicom_wsi(tmp_path / "again", tissue[:1024, :1024], stem="f", series_uid=built.series_uid)
    os.replace(tmp_path / "again" / "f-label.dcm", built.label)
    stat = built.label.stat()
    os.utime(built.label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    [changed] = tile_patient(list_slides(tmp_path), params)
    after_entry = slide_entry(changed, None, None)
    assert after_entry["quickhash1"] == entry["quickhash1"]
    assert inputs_fingerprint(list_slides(tmp_path), params) != before[0]
    assert slide_fingerprint(after_entry) != before[1]


# ---------------------------------------------------------------- through Dagster


def test_patch_coords_and_uni_features_take_the_series_as_one_slide(instance, base_resources, data_root: Path,
                                                                    tissue, test_data):
    wsi = data_root / "landing" / "PDCM" / "wsi"
    built = write_dicom_wsi(wsi, tissue, stem="cmu1")
    write_ct_slice(data_root / "landing" / "PBAD" / "wsi" / "ct-0001.dcm")
    resources = {**base_resources, "pathology": TilingSettings(),
                 "encoder": PatchEncoder(name="vit-tiny-random", batch_size=16)}
    result = materialize_patient(instance, [patch_coords, uni_features], resources, "PDCM")
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())

    folder = data_root / "artifacts" / "patch_coords" / "PDCM"
    listing = json.loads((folder / "slides.json").read_text(encoding="utf-8"))
    [entry] = listing["slides"]
    assert listing["n_slides"] == 1 and sorted(p.name for p in folder.glob("*.h5")) == ["cmu1-level0.h5"]
    assert entry["file"] == "cmu1-level0.dcm" and entry["vendor"] == "dicom" and entry["mpp"] == [0.499, 0.499]
    assert {f["file"] for f in entry["source_files"]} == {p.name for p in built.files}
    assert [i["file"] for i in entry["dicom"]["ignored_instances"]] == ["cmu1-label.dcm", "cmu1-thumbnail.dcm"]
    coords_meta = metadata_of(result, "patch_coords")
    assert coords_meta["dicom_series"]["cmu1-level0.dcm"] == entry["dicom"]
    assert "DICOM series of 4 files: 2 VOLUME tiled, 2 ignored" in coords_meta["slides"]
    with h5py.File(folder / "cmu1-level0.h5", "r") as fh:
        coords = fh["coords"][()]
    # Tiled from the VOLUME pyramid only: every patch lies on level 0, and the grid is the SVS's own
    # up to JPEG re-encoding (tissue found on the same places).
    assert coords.min() >= 0 and (coords + 256 <= np.array([2220 + 256, 2967 + 256])).all()
    with opened(real_slide(test_data), default_mpp=0.5) as svs:
        svs_coords = tile_slide(svs, TilingParams()).coords
    ours, theirs = set(map(tuple, coords)), set(map(tuple, svs_coords))
    assert len(ours & theirs) / len(ours | theirs) >= 0.95  # 1.0 (44 of 44) when measured

    features_meta = metadata_of(result, "uni_features")
    assert features_meta["n_slides"] == 1 and features_meta["readers"] == {"cmu1-level0.h5": "openslide"}
    assert features_meta["dicom_series"]["cmu1-level0.h5"]["opened_file"] == "cmu1-level0.dcm"
    features_file = data_root / "artifacts" / "uni_features" / "PDCM" / "cmu1-level0.h5"
    with h5py.File(features_file, "r") as fh:
        features, feature_coords = fh["features"][()], fh["coords"][()]
        assert fh.attrs["reader"] == "openslide" and fh.attrs["slide_path"] == str(built.volumes[0])
    assert features.shape == (len(coords), 192)
    # The features are the encoder on OpenSlide's pixels of the series.
    expected = reference_features(load_encoder("vit-tiny-random"), built.volumes[0], feature_coords[:6], read_size=256)
    assert cosine_rows(features[:6], expected).min() > 0.9999

    # A stray CT slice in another patient's slide folder fails that patient, naming the file.
    bad = materialize_patient(instance, [patch_coords], resources, "PBAD")
    assert not bad.success
    error = bad.get_step_failure_events()[0].step_failure_data.error
    message = error.message + (error.cause.message if error.cause else "")
    assert "patient PBAD" in message and "ct-0001.dcm: is a DICOM CT Image Storage instance" in message
    shutil.rmtree(data_root / "landing" / "PBAD")
