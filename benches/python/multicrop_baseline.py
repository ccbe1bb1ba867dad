"""Baseline: the official SwAV multi-crop pipeline, torchvision transforms on PIL images.

Per image (as in the official MultiCropDataset): open the file and convert to RGB once, then for each of
2 crops of 224 (scale 0.14-1) and 6 crops of 96 (scale 0.05-0.14): RandomResizedCrop (bilinear),
RandomHorizontalFlip, colour distortion (ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, RandomGrayscale
p 0.2), PIL Gaussian blur with p 0.5 and radius ~ U(0.1, 2), ToTensor, Normalize(ImageNet mean, std
0.228/0.224/0.225). A DataLoader with N worker processes batches the crops; we count images per second
after the first batch.

usage: multicrop_baseline.py IMAGE_DIR [--workers N] [--seconds S] [--batch B]
"""
import argparse
import glob
import os
import random
import time

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

MEAN = [0.485, 0.456, 0.406]
STD = [0.228, 0.224, 0.225]


class RandomPilBlur:
    """Gaussian blur of PIL with probability p and a radius drawn uniformly."""

    def __init__(self, p=0.5, lo=0.1, hi=2.0):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


def crop_transform(size, scale):
    jitter = T.ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([jitter], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomPilBlur(),
        T.ToTensor(),
        T.Normalize(mean=MEAN, std=STD),
    ])


class MultiCrop(torch.utils.data.Dataset):
    def __init__(self, files, groups):
        self.files = files
        self.transforms = [crop_transform(size, scale) for count, size, scale in groups for _ in range(count)]

    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        with open(self.files[i % len(self.files)], "rb") as f:
            img = Image.open(f).convert("RGB")
        return [t(img) for t in self.transforms]


def cpu_seconds(pids):
    """User + system CPU time of these processes (Linux /proc), or None."""
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    exts = (".jpg", ".jpeg", ".png", ".JPEG")
    files = sorted(f for f in glob.glob(os.path.join(args.images, "**", "*"), recursive=True) if f.endswith(exts))
    if not files:
        raise SystemExit(f"no images in {args.images}")
    torch.set_num_threads(1)
    ds = MultiCrop(files, [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    it = iter(loader)
    next(it)
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    cpu0 = cpu_seconds(pids)
    n, t0 = 0, time.time()
    while time.time() - t0 < args.seconds:
        n += next(it)[0].shape[0]
    rate = n / (time.time() - t0)
    cpu1 = cpu_seconds(pids)
    print(f"{rate:.1f} images/s (torchvision {__import__('torchvision').__version__} + PIL, {args.workers} workers)")
    if cpu0 is not None and cpu1 is not None:
        print(f"{(cpu1 - cpu0) * 1e3 / n:.2f} ms of CPU per image (all processes)")


if __name__ == "__main__":
    main()
