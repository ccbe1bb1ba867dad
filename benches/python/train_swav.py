"""PyTorch port of the official SwAV training loop (main_swav.py), driven by a swav-rs run's resolved
configuration, to compare learning quality with swav-rs on the same images and the same evaluation.

It reads `config.toml` from a swav-rs run folder (model, crops, train tables), trains on the first
`--train-count` images of an IDX file (the embedded demo: the first 8,000 of the Fashion-MNIST test
split, the images `cargo xtask pipeline` trains on), and writes a PyTorch checkpoint with the official
names (`conv1.weight`, `layer1.0.bn1.running_mean`, `projection_head.0.weight`, `prototypes.weight`)
that `cargo xtask import` turns into a model file for `cargo xtask eval`.

The loop is main_swav.py's: per iteration the lr of the warm-up + cosine schedule, prototypes
L2-normalised, codes by Sinkhorn (epsilon, iterations) for `crops_for_assign`, the swapped loss over
every other crop at the temperature, prototypes' gradients dropped while iteration <
freeze_prototypes_niters, and LARC (apex semantics: trust ratio with weight decay folded in, clip off)
around SGD with momentum. The augmentation is the official one as the run configures it:
RandomResizedCrop(size, scale), horizontal flip, ColorJitter with probability `jitter_p` (grayscale and
blur when configured), normalisation by the training images' mean and std. Queue: not ported
(`queue_length` must be 0, as in the CPU presets).

    python benches/python/train_swav.py --run runs/pipeline/run --idx t10k-images-idx3-ubyte.gz \
        --train-count 8000 --seed 1 --out torch-seed1.pth
"""
import argparse
import gzip
import json
import math
import random
import time
import tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms


def read_idx_images(path, count):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], dtype=">u4")
    if magic != 2051:
        raise SystemExit(f"{path}: not an IDX image file (magic {magic})")
    if count > n:
        raise SystemExit(f"{path}: {n} images, {count} asked for")
    return np.frombuffer(data[16:16 + count * h * w], dtype=np.uint8).reshape(count, h, w)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class SwavNet(nn.Module):
    """ResNet-18/34 of any width (torchvision names), the small stem as configured, projection head
    Linear-BN-ReLU-Linear and bias-free prototypes: the official resnet50.py structure."""

    def __init__(self, m):
        super().__init__()
        blocks = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}[m["arch"]]
        width = m.get("width", 64)
        cin = m.get("in_channels", 3)
        if m.get("small_stem", False):
            self.conv1 = nn.Conv2d(cin, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(cin, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        c = width
        for i, n in enumerate(blocks):
            out = width * 2 ** i
            layers = [BasicBlock(c, out, 1 if i == 0 else 2)] + [BasicBlock(out, out, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            c = out
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        self.projection_head = nn.Sequential(
            nn.Linear(c, m["hidden_mlp"]), nn.BatchNorm1d(m["hidden_mlp"]), nn.ReLU(inplace=True),
            nn.Linear(m["hidden_mlp"], m["feat_dim"]))
        if len(m["prototypes"]) != 1:
            raise SystemExit("one prototype head only")
        self.prototypes = nn.Linear(m["feat_dim"], m["prototypes"][0], bias=False)

    def forward_backbone(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, groups):
        # main_swav.py's multi-resolution forward: one backbone pass per crop size, then the head.
        feats = torch.cat([self.forward_backbone(g) for g in groups])
        z = F.normalize(self.projection_head(feats), dim=1, p=2)
        return z, self.prototypes(z)


class MultiCrop:
    def __init__(self, crops, mean, std):
        a = crops["augment"]
        self.groups = []
        for g in crops["groups"]:
            steps = [transforms.RandomResizedCrop(g["size"], scale=(g["min_scale"], g["max_scale"]),
                                                  ratio=tuple(a["ratio"])),
                     transforms.RandomHorizontalFlip(p=a["flip_p"])]
            jitter = transforms.ColorJitter(a["brightness"], a["contrast"], a["saturation"], a["hue"])
            steps.append(transforms.RandomApply([jitter], p=a["jitter_p"]))
            if a["grayscale_p"] > 0:
                steps.append(transforms.RandomGrayscale(p=a["grayscale_p"]))
            if a["blur_p"] > 0:
                lo, hi = a["blur_sigma"]
                blur = transforms.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(random.uniform(lo, hi))))
                steps.append(transforms.RandomApply([blur], p=a["blur_p"]))
            steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
            self.groups.append((g["count"], transforms.Compose(steps)))

    def __call__(self, images):
        """Crop-major groups [count * batch, 1, size, size] of a batch of uint8 images."""
        pil = [Image.fromarray(im, mode="L") for im in images]
        return [torch.cat([torch.stack([t(im) for im in pil]) for _ in range(count)]) for count, t in self.groups]


@torch.no_grad()
def sinkhorn(out, epsilon, iterations):
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def larc_sgd_step(params, lr, momentum, weight_decay, trust, bufs, use_lars):
    """apex LARC(SGD(momentum, weight_decay), trust_coefficient, clip=False), as main_swav.py."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            g = p.grad
            if use_lars:
                p_norm, g_norm = torch.norm(p), torch.norm(g)
                # apex adds the weight decay only where it scales the gradient.
                if p_norm != 0 and g_norm != 0:
                    adaptive = trust * p_norm / (g_norm + p_norm * weight_decay + 1e-8)
                    g = (g + weight_decay * p) * adaptive
            else:
                g = g + weight_decay * p
            buf = bufs.get(p)
            if buf is None:
                buf = g.clone()
                bufs[p] = buf
            else:
                buf.mul_(momentum).add_(g)
            p.add_(buf, alpha=-lr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a swav-rs run folder (its config.toml is the recipe)")
    ap.add_argument("--idx", required=True, help="IDX image file (gz)")
    ap.add_argument("--train-count", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(f"{args.run}/config.toml", "rb") as f:
        cfg = tomllib.load(f)
    t = cfg["train"]
    if t.get("queue_length", 0) != 0:
        raise SystemExit("the queue is not ported: queue_length must be 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    images = read_idx_images(args.idx, args.train_count)
    a = cfg["crops"]["augment"]
    mean = a.get("mean") or [float(images.mean() / 255.0)]
    std = a.get("std") or [float(images.std() / 255.0)]
    crops = MultiCrop(cfg["crops"], mean, std)
    model = SwavNet(cfg["model"])
    bs = t["batch_size"]
    steps_per_epoch = len(images) // bs  # drop_last, as the official DataLoader
    warm = np.linspace(t.get("start_warmup", 0.0), t["base_lr"], steps_per_epoch * t["warmup_epochs"])
    iters = np.arange(steps_per_epoch * (t["epochs"] - t["warmup_epochs"]))
    cosine = np.array([t["final_lr"] + 0.5 * (t["base_lr"] - t["final_lr"]) *
                       (1 + math.cos(math.pi * i / len(iters))) for i in iters])
    schedule = np.concatenate((warm, cosine))
    params = list(model.parameters())
    bufs = {}
    assign = t["crops_for_assign"]
    n_crops = sum(g["count"] for g in cfg["crops"]["groups"])
    it = 0
    start = time.time()
    for epoch in range(t["epochs"]):
        model.train()
        order = np.random.permutation(len(images))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * bs:(s + 1) * bs]
            groups = crops(images[idx])
            lr = schedule[it]
            with torch.no_grad():
                w = model.prototypes.weight.data.clone()
                model.prototypes.weight.copy_(F.normalize(w, dim=1, p=2))
            _, output = model(groups)
            loss = 0
            for i, crop_id in enumerate(assign):
                with torch.no_grad():
                    out = output[bs * crop_id: bs * (crop_id + 1)].detach()
                    q = sinkhorn(out, t["epsilon"], t["sinkhorn_iterations"])[-bs:]
                subloss = 0
                for v in np.delete(np.arange(n_crops), crop_id):
                    x = output[bs * v: bs * (v + 1)] / t["temperature"]
                    subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
                loss += subloss / (n_crops - 1)
            loss /= len(assign)
            for p in params:
                p.grad = None
            loss.backward()
            if it < t["freeze_prototypes_niters"]:
                model.prototypes.weight.grad = None
            larc_sgd_step(params, lr, t["momentum"], t["weight_decay"], t["trust_coefficient"], bufs, t["lars"])
            losses.append(loss.item())
            it += 1
        print(json.dumps({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1)}),
              flush=True)
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": t["epochs"], "mean": mean, "std": std}, args.out)
    print(json.dumps({"out": args.out, "mean": mean, "std": std, "images_per_second":
                      round(t["epochs"] * steps_per_epoch * bs / (time.time() - start), 1)}))


if __name__ == "__main__":
    main()
