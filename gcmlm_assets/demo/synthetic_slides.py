"""The synthetic patient's H&E slides as pyramidal TIFFs (plain Python, no Dagster).

H&E-like tissue (pink stroma, purple nuclei, tumour nests, white background) whose nuclear
density and size and share of tumour nests rise with the patient's pathology severity
(synthetic_plan.py), written as tiled pyramidal TIFFs (JPEG tiles, 256 px, levels /1 /2 /4 /8,
resolution tags in pixels per centimetre so OpenSlide reports `openslide.mpp-x`).
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import tifffile

# H&E colours (RGB): background glass, eosin-stained stroma, tumour-cell cytoplasm, haematoxylin nuclei.
RGB_GLASS = np.array([243, 241, 244], np.float32)
RGB_STROMA = np.array([232, 158, 196], np.float32)
RGB_CYTOPLASM = np.array([206, 146, 198], np.float32)
RGB_NUCLEUS = np.array([84, 52, 138], np.float32)


def resized_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Unit-SD smooth noise at full size, drawn on a coarse grid of `cell` pixels and upsampled."""
    coarse = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), 1.0)
    fine = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine -= fine.mean()
    return fine / max(float(fine.std()), 1e-6)


def make_slide(rng: np.random.Generator, width: int, height: int, severity: float, mpp: float) -> np.ndarray:
    """An H&E-like RGB image (uint8, height x width x 3).

    Tissue is a blob of smooth noise inside an elliptical envelope; inside it, tumour nests (a
    share rising with `severity`) hold dense, large nuclei on lilac cytoplasm, and stroma holds
    sparse, small, elongated nuclei on pink. Sizes are set in micrometres and converted with `mpp`.
    """
    um = 1.0 / mpp  # pixels per micrometre
    ys = ((np.arange(height, dtype=np.float32) - height / 2) / (0.44 * height)) ** 2
    xs = ((np.arange(width, dtype=np.float32) - width / 2) / (0.46 * width)) ** 2
    shape_noise = resized_noise(rng, height, width, cell=int(250 * um))
    tissue = (1.0 - ys[:, None] - xs[None, :] + 0.35 * shape_noise) > 0.25

    nest_share = float(np.clip(0.30 + 0.11 * severity + rng.normal(0, 0.02), 0.05, 0.85))
    nest_field = resized_noise(rng, height, width, cell=int(60 * um))
    threshold = float(np.quantile(nest_field[tissue], 1.0 - nest_share)) if tissue.any() else 0.0
    nests = tissue & (nest_field > threshold)
    # 0 glass, 1 stroma, 2 tumour nest
    region = tissue.astype(np.uint8) + nests.astype(np.uint8)

    stain = resized_noise(rng, height, width, cell=int(120 * um))
    palette = np.stack([RGB_GLASS, RGB_STROMA, RGB_CYTOPLASM])
    stain_amplitude = np.array([0.0, 10.0, 8.0], np.float32)
    rgb = palette[region] + (stain_amplitude[region] * stain)[..., None]

    # Nuclei: Poisson counts per area; tumour nuclei denser and larger as severity rises.
    nuclei = np.zeros((height, width), np.uint8)
    stroma = tissue & ~nests
    area_um2 = {"nest": nests.sum() / um**2, "stroma": stroma.sum() / um**2}
    density = {"nest": 5000e-6 * math.exp(0.22 * severity), "stroma": 800e-6}  # per µm²
    radius_um = {"nest": 3.6 * math.exp(0.08 * severity), "stroma": 2.4}
    for name, mask in (("nest", nests), ("stroma", stroma)):
        count = int(rng.poisson(density[name] * area_um2[name]))
        if count == 0:
            continue
        candidates_y = rng.integers(0, height, size=count * 3)
        candidates_x = rng.integers(0, width, size=count * 3)
        inside = mask[candidates_y, candidates_x]
        cy, cx = candidates_y[inside][:count], candidates_x[inside][:count]
        radii = rng.normal(radius_um[name], 0.5, size=len(cy)).clip(1.2) * um
        elongation = rng.uniform(1.0, 1.3 if name == "nest" else 2.2, size=len(cy))
        angles = rng.uniform(0, 180, size=len(cy))
        for y, x, r, e, a in zip(cy.tolist(), cx.tolist(), radii.tolist(), elongation.tolist(), angles.tolist()):
            axes = (max(1, int(round(r * e))), max(1, int(round(r / e))))
            cv2.ellipse(nuclei, (x, y), axes, a, 0, 360, 255, -1)
    weight = cv2.GaussianBlur(nuclei, (0, 0), 0.8).astype(np.float32) / 255.0
    nucleus_colour = RGB_NUCLEUS + 12.0 * stain[..., None]
    rgb += weight[..., None] * (nucleus_colour - rgb)
    rgb += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    images = [rgb]
    for _ in range(1, levels):
        previous = images[-1]
        if min(previous.shape[:2]) < 64:
            break
        images.append(cv2.resize(previous, (previous.shape[1] // 2, previous.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return images


def pyramidal_tiff_bytes(rgb: np.ndarray, mpp: float, levels: int, quality: int = 90) -> bytes:
    """A tiled, JPEG-compressed, pyramidal TIFF: one directory per level, level 0 first.

    OpenSlide reads this as `generic-tiff` and derives `openslide.mpp-x/y` from the resolution
    tags (pixels per centimetre)."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, bigtiff=False) as tif:
        for level, image in enumerate(pyramid(rgb, levels)):
            pixels_per_cm = 1e4 / (mpp * 2**level)
            tif.write(
                image,
                photometric="rgb",
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=f"synthetic H&E, level {level}" if level == 0 else None,
                metadata=None,
                # The generator that writes the cohort (synthetic.py): part of every slide's bytes.
                software="gcmlm_assets.demo.synthetic",
            )
    return buffer.getvalue()
