"""Synthetic photo-like JPEGs for loader benchmarks (no photo dataset is reachable offline).

Each image: smooth colour gradients (low-frequency sinusoids per channel), a few soft-edged shapes,
Gaussian noise, JPEG quality 90; 256 px on the short side, landscape 341x256 or portrait 256x384,
spread over 4 class folders. They compress and decode like ordinary camera JPEGs of that size.

usage: make_photos.py OUT_DIR N
"""
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(2026)
    for c in range(4):
        os.makedirs(os.path.join(out, f"class{c}"), exist_ok=True)
    for i in range(n):
        w, h = (341, 256) if i % 2 == 0 else (256, 384)
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        chans = []
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.5, 5), rng.uniform(0.5, 5), rng.uniform(0, 2 * np.pi)
            chans.append(0.5 + 0.5 * np.sin(fx * xx * 2 + fy * yy * 2 + ph))
        img = Image.fromarray((np.stack(chans, -1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, 140)), y0 + int(rng.integers(10, 140))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2))).astype(np.float32)
        arr += rng.normal(0, 6, arr.shape)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
            os.path.join(out, f"class{i % 4}", f"{i:05d}.jpg"), quality=90)


if __name__ == "__main__":
    main()
