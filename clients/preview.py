"""A PNG montage to glance at a segmentation: a few axial slices through the liver with the liver outlined in green
and lesions tinted and outlined in red, in a fixed abdominal window.

Drawn with Pillow (PIL), which the client already has (highdicom depends on it); no matplotlib, no torch.

* Slices are shown as a radiologist reads them: axial, patient right on the image's left, anterior at the top,
  superior first, each slice's pixels stretched to their true physical aspect (non-square pixels stay undistorted).
* The slices are spread over the liver's extent by liver volume (so most of them show a lot of liver); the slice
  with the largest lesion area is always one of them. With no liver found they are spread over the whole scan.
* The window is fixed (W 400 / L 40 HU, the usual abdominal soft-tissue window) so previews of different scans
  compare; it is printed in the header with the volumes. Nothing about the patient is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mixsup.clients.stats import describe
from mixsup.files import atomic_path
from mixsup.scan import Scan

if TYPE_CHECKING:
    from mixsup.clients.result import Result

#: Abdominal soft-tissue window (level, width) in HU.
WINDOW_LEVEL_HU, WINDOW_WIDTH_HU = 40.0, 400.0
#: Slices in the montage and how many per row.
SLICE_COUNT, COLUMNS = 6, 3
#: The longer side of one slice in the montage, in pixels.
TILE_PX = 256
GAP_PX, HEADER_PX = 4, 22
LIVER_RGB = (40, 220, 40)
LESION_RGB = (255, 50, 50)
LESION_TINT_ALPHA = 0.45
TEXT_RGB = (255, 230, 90)
#: The organ (liver with its lesions) and lesion labels of the label maps drawn here.
ORGAN_LABELS, LESION_LABEL = (1, 2), 2


def choose_slices(labels: np.ndarray, count: int = SLICE_COUNT) -> list[int]:
    """Axial slice indices of a canonical ``[D, H, W]`` label map to show, superior first (largest index first).

    Spread by liver volume over the liver's extent, the slice of largest lesion area included; evenly over the
    volume when there is no liver.
    """
    depth = labels.shape[0]
    count = max(1, min(count, depth))
    organ_area = np.isin(labels, ORGAN_LABELS).sum(axis=(1, 2)).astype(np.float64)
    if organ_area.sum() == 0:
        return sorted(set(np.linspace(0, depth - 1, count).round().astype(int).tolist()), reverse=True)
    cumulative = np.cumsum(organ_area) / organ_area.sum()
    quantiles = (np.arange(count) + 0.5) / count
    chosen = [int(np.searchsorted(cumulative, q)) for q in quantiles]
    lesion_area = (labels == LESION_LABEL).sum(axis=(1, 2))
    if lesion_area.any():
        biggest = int(np.argmax(lesion_area))
        if biggest not in chosen:
            # Replace the chosen slice nearest to it, so the spread over the liver is kept.
            nearest = min(range(len(chosen)), key=lambda k: abs(chosen[k] - biggest))
            chosen[nearest] = biggest
    return sorted(set(chosen), reverse=True)


def _window(hu: np.ndarray) -> np.ndarray:
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    scaled = (hu.astype(np.float32) - low) / WINDOW_WIDTH_HU
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)


#: Outline width in display pixels: 1 px disappears when a viewer scales the PNG down.
OUTLINE_PX = 2


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=OUTLINE_PX, border_value=0)


def render_slice(hu: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """One canonical axial slice (``[H, W]`` HU and labels) as an RGB image of ``size`` (width, height) with the
    overlay. Masks are resized with nearest neighbours and outlined at display resolution, so outlines are crisp."""
    grey = Image.fromarray(_window(hu)).resize(size, Image.Resampling.BILINEAR)
    rgb = np.asarray(grey.convert("RGB"), dtype=np.float32)

    def resized(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0

    organ, lesion = resized(np.isin(labels, ORGAN_LABELS)), resized(labels == LESION_LABEL)
    rgb[lesion] = (1 - LESION_TINT_ALPHA) * rgb[lesion] + LESION_TINT_ALPHA * np.asarray(LESION_RGB, np.float32)
    rgb[_outline(organ)] = LIVER_RGB
    rgb[_outline(lesion)] = LESION_RGB
    return Image.fromarray(rgb.round().astype(np.uint8))


def render_preview(scan: Scan, labels: np.ndarray, header: str = "", count: int = SLICE_COUNT) -> Image.Image:
    """The montage for ``labels`` on ``scan``'s stored grid, ``header`` printed above it."""
    hu, spacing = scan.canonical()
    canonical_labels, _ = Scan(voxels=np.asarray(labels), affine=scan.affine).canonical()
    depth, height, width = hu.shape
    # True physical aspect: the longer physical side gets TILE_PX pixels.
    extent_h, extent_w = height * spacing[1], width * spacing[2]
    scale = TILE_PX / max(extent_h, extent_w)
    tile_w, tile_h = max(1, round(extent_w * scale)), max(1, round(extent_h * scale))
    slices = choose_slices(canonical_labels, count)
    columns = min(COLUMNS, len(slices))
    rows = -(-len(slices) // columns)
    font = ImageFont.load_default()
    header_w = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(header, font=font)
    canvas_w = max(columns * tile_w + (columns + 1) * GAP_PX, int(header_w) + 2 * GAP_PX)
    canvas = Image.new("RGB", (canvas_w, HEADER_PX + rows * (tile_h + GAP_PX) + GAP_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP_PX, 4), header, fill=TEXT_RGB, font=font)
    for index, d in enumerate(slices):
        row, column = divmod(index, columns)
        x0 = GAP_PX + column * (tile_w + GAP_PX)
        y0 = HEADER_PX + row * (tile_h + GAP_PX)
        canvas.paste(render_slice(hu[d], canonical_labels[d], (tile_w, tile_h)), (x0, y0))
        draw.text((x0 + 3, y0 + 2), f"slice {d + 1}/{depth} (from feet)", fill=TEXT_RGB, font=font)
        # Radiological convention: the patient's right is on the viewer's left.
        draw.text((x0 + 3, y0 + tile_h // 2 - 6), "R", fill=TEXT_RGB, font=font)
        draw.text((x0 + tile_w - 10, y0 + tile_h // 2 - 6), "L", fill=TEXT_RGB, font=font)
    return canvas


def preview_header(result: "Result") -> str:
    """``liver ... mL, N lesions ... mL (burden ...) | W400 L40 | green liver, red lesion``."""
    return (
        f"{describe(result.stats)} | W{WINDOW_WIDTH_HU:g} L{WINDOW_LEVEL_HU:g} | green: liver, red: lesion | "
        "not for diagnosis"
    )


def write_preview(output: Path, scan: Scan, result: "Result", count: int = SLICE_COUNT) -> Path:
    """Render the montage of ``result`` on ``scan`` and write it as PNG, atomically."""
    image = render_preview(scan, result.labels, preview_header(result), count)
    with atomic_path(output, ".png") as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return Path(output)
