"""The size rules of the UI's pictures: at least 800 px wide, under 60,000 bytes of markdown.

`assert_ui_picture` (gcmlm_assets_tests/support/pictures.py) is also what the domain tests use on
their assets' metadata.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gcmlm_assets import pictures
from gcmlm_assets_tests.support.pictures import (
    LIMIT_BYTES, MIN_WIDTH, PATIENT_LIMIT_BYTES, assert_ui_picture, decode_markdown,
)


def _noisy_ct_planes(rng: np.random.Generator) -> np.ndarray:
    """Three 512 px planes of soft tissue with CT-like noise, bone specks and air, side by side."""
    y, x = np.mgrid[0:512, 0:512]
    body = (y - 256) ** 2 / 230**2 + (x - 256) ** 2 / 245**2 < 1
    planes = []
    for _ in range(3):
        hu = np.where(body, 40 + rng.normal(0, 45, body.shape), -1000 + rng.normal(0, 15, body.shape))
        hu[rng.random(body.shape) < 0.01] = 900  # bone and contrast specks
        grey = np.clip((hu - (40 - 200)) / 400 * 255, 0, 255).astype(np.uint8)
        planes.append(np.stack([grey] * 3, axis=-1))
    picture = np.concatenate(planes, axis=1)
    picture[250:262, 200:1300] = (230, 30, 30)  # a red outline across the planes
    return picture


def test_worst_case_ct_planes_fit_the_budget_at_a_readable_width(tmp_path):
    planes = _noisy_ct_planes(np.random.default_rng(0))
    picture = pictures.render(planes, pictures.PHOTO, "CT thumbnail")
    # The full-size copy is lossless: every pixel comes back.
    with Image.open(io.BytesIO(picture.full_png)) as full:
        assert full.format == "PNG" and np.array_equal(np.asarray(full.convert("RGB")), planes)
    # Noise like this is far over the limit as PNG; the display copy fits and stays wide.
    assert len(picture.full_png) > 3 * LIMIT_BYTES
    markdown = picture.display.markdown("CT thumbnail")
    path = pictures.save_png(picture.full_png, tmp_path / "ct.png")
    shown = assert_ui_picture(markdown, path)
    assert (shown.width, shown.height) == (picture.display.width, picture.display.height)
    # The picture is still the picture: the red line is where it was, the body is grey.
    rgb = np.asarray(shown.convert("RGB")).astype(int)
    row = round(256 * shown.height / planes.shape[0])
    red = rgb[row, shown.width // 4]
    assert red[0] > 150 and red[1] < 100 and red[2] < 100, red
    grey = rgb[round(100 * shown.height / planes.shape[0]), shown.width // 6]
    assert abs(grey[0] - grey[1]) < 25 and abs(grey[1] - grey[2]) < 25, grey


def test_a_per_patient_picture_fits_half_the_budget_and_stays_readable(tmp_path):
    planes = _noisy_ct_planes(np.random.default_rng(0))
    path = pictures.save_png(pictures.rgb_png(planes), tmp_path / "ct.png")
    markdown = pictures.patient_picture_markdown(path, pictures.PHOTO, "CT thumbnail")
    shown = assert_ui_picture(markdown, path, PATIENT_LIMIT_BYTES)
    rgb = np.asarray(shown.convert("RGB")).astype(int)
    red = rgb[round(256 * shown.height / planes.shape[0]), shown.width // 4]
    assert red[0] > 150 and red[1] < 100 and red[2] < 100, red
    # the cohort's own pictures keep the whole budget
    assert len(pictures.picture_markdown(path, pictures.PHOTO, "CT thumbnail").encode()) > PATIENT_LIMIT_BYTES


def test_busy_plot_degrades_to_fit_but_stays_wide():
    plt = pictures.pyplot()
    rng = np.random.default_rng(1)
    fig, ax = plt.subplots(figsize=(8, 6))
    x = np.linspace(0, 1, 400)
    for k in range(12):
        ax.plot(x, np.cumsum(rng.normal(0, 0.05, x.size)) + k * 0.1, label=f"model {k}")
    ax.scatter(rng.random(2000), rng.random(2000) * 3, s=4, alpha=0.5)
    ax.set(title="twelve random walks and two thousand points", xlabel="threshold", ylabel="net benefit")
    ax.legend(fontsize=8, ncol=3)
    picture = pictures.render(fig, pictures.PLOT, "busy plot")
    markdown = picture.display.markdown("busy plot")
    assert len(markdown.encode()) < LIMIT_BYTES
    _, mime, shown = decode_markdown(markdown)
    assert shown.width >= MIN_WIDTH
    with Image.open(io.BytesIO(picture.full_png)) as full:
        assert full.width >= 1000  # 8 in at 150 dpi, less the trimmed margin
    # Thousands of translucent points do not fit as a palette PNG: lossy WebP it is, still 800 px.
    assert mime == "image/webp" and picture.display.encoding.startswith("webp")


def test_a_small_picture_is_enlarged_to_the_minimum_width():
    small = np.zeros((120, 300, 3), np.uint8)
    small[:, 150:] = 255
    display = pictures.display_version(small, pictures.PLOT, "small")
    assert (display.width, display.height) == (MIN_WIDTH, 320)
    assert display.mime == "image/png" and display.encoding == "png 256 colours"


def test_incompressible_noise_still_stays_under_the_limit():
    noise = np.random.default_rng(2).integers(0, 256, size=(1400, 2400, 3), dtype=np.uint8)
    display = pictures.display_version(noise, pictures.PHOTO, "noise")
    assert len(display.markdown("noise").encode()) < LIMIT_BYTES
    # Pure noise is the one case where the byte limit may cost width; real pictures never get here.
    assert display.width >= 200


def test_stored_picture_markdown_and_unknown_kind(tmp_path):
    planes = _noisy_ct_planes(np.random.default_rng(3))
    path = pictures.save_png(pictures.rgb_png(planes), tmp_path / "full.png")
    markdown = pictures.picture_markdown(path, pictures.PHOTO, "stored")
    alt, mime, shown = decode_markdown(markdown)
    assert alt == "stored" and mime == "image/webp" and shown.width >= MIN_WIDTH
    with pytest.raises(ValueError, match="picture kind 'chart'"):
        pictures.display_version(planes, "chart")
