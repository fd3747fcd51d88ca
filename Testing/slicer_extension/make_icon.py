"""Draw the extension icon (128x128 PNG): a PET-like body with a hot lesion under a grid of latent tokens,
the lesion's tokens masked out, as ILTM does. Writes both copies Slicer needs.

    python Testing/slicer_extension/make_icon.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TARGETS = (REPO / "Resources" / "Icons" / "ILTMAnomaly.png",
           REPO / "ILTMAnomaly" / "Resources" / "Icons" / "ILTMAnomaly.png")
SIZE = 128


def heat(values: np.ndarray) -> np.ndarray:
    """PET-Heat-like ramp: black -> dark red -> orange -> yellow -> white, values in [0, 1]."""
    stops = np.array([0.0, 0.35, 0.55, 0.75, 1.0])
    colours = np.array([[0, 0, 0], [0.6, 0.0, 0.0], [0.95, 0.4, 0.0], [1.0, 0.9, 0.1], [1.0, 1.0, 1.0]])
    return np.stack([np.interp(values, stops, colours[:, c]) for c in range(3)], axis=-1)


def draw() -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE] + 0.5
    body = ((x - 64) / 50) ** 2 + ((y - 66) / 56) ** 2 < 1
    uptake = np.where(body, 0.16, 0.0)
    uptake += 0.3 * np.exp(-(((x - 64) / 18) ** 2 + ((y - 34) / 14) ** 2))     # brain-like physiological uptake
    lesion = np.exp(-(((x - 84) ** 2 + (y - 80) ** 2) / (2 * 9.0 ** 2)))
    image = heat(np.clip(uptake + 0.95 * lesion, 0, 1))
    alpha = np.where(body, 1.0, 0.0)

    # The latent token grid (16 px tokens); tokens over the lesion are "masked": darkened with a cyan frame.
    grid = 16
    lines = (np.mod(x, grid) < 1.2) | (np.mod(y, grid) < 1.2)
    image[lines & body] = 0.55 * image[lines & body] + 0.45 * np.array([0.3, 0.8, 0.95])
    token_x, token_y = (x // grid).astype(int), (y // grid).astype(int)
    masked = np.zeros((SIZE // grid, SIZE // grid), bool)
    masked[4:6, 4:6] = True  # tokens covering the lesion at (84, 80)
    inside_masked = masked[token_y, token_x]
    frame = inside_masked & ((np.mod(x, grid) < 2.5) | (np.mod(x, grid) > grid - 2.5) |
                             (np.mod(y, grid) < 2.5) | (np.mod(y, grid) > grid - 2.5))
    image[inside_masked & ~frame] *= 0.8
    image[frame] = np.array([0.1, 0.9, 1.0])
    alpha[frame] = 1.0
    rgba = np.concatenate([image, alpha[..., None]], axis=-1)
    return (np.clip(rgba, 0, 1) * 255 + 0.5).astype(np.uint8)


def main() -> int:
    sys.path.insert(0, str(REPO / "ILTMAnomaly"))
    from ILTMAnomalyLib.rendering import write_png

    pixels = draw()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(pixels, target)
        print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
