"""Reference cases for swav-rs (kind = swav_model), computed by PyTorch in float64 and stored as float32.

    /work/venv-torch/bin/python swav-reference/scripts/make_cases.py --out swav-reference/cases
                          # writes swav_model_small_0/1.safetensors (run from the repository root)
    /work/venv-torch/bin/python swav-reference/scripts/make_cases.py --float32 CASE.safetensors ...
                          # prints PyTorch's own float32 error on every tensor of model cases (a
                          # diagnostic: what a correct float32 implementation misses by)

Model cases follow swav-reference/cases/README.md (kind = swav_model) with two extra metadata keys,
`width` (channels of the stem and first stage) and `small_stem`, so narrow networks keep the files
small. A case is kept only if float32 arithmetic keeps every ReLU decision of float64 (see
make_case): the tests judge every tensor by one rule (cases/README.md), which tells float32 rounding
from errors only where float32 can reproduce the case.
Needs: torch, safetensors, numpy.
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class Block(nn.Module):
    """torchvision BasicBlock (two 3x3) or Bottleneck (1x1, 3x3 with the stride, 1x1 x4)."""

    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        if bottleneck:
            shapes = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, planes * 4, 1, 1)]
        else:
            shapes = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
        for i, (a, b, k, s) in enumerate(shapes):
            setattr(self, f"conv{i + 1}", nn.Conv2d(a, b, k, s, k // 2, bias=False))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(b))
        self.n = len(shapes)
        cout = shapes[-1][1]
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.cout = cout

    def forward(self, x):
        out = x
        for i in range(1, self.n + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n:
                out = F.relu(out)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class SwavNet(nn.Module):
    def __init__(self, arch, width, small_stem, in_channels, hidden_mlp, feat_dim, prototypes):
        super().__init__()
        bottleneck = arch == "resnet50"
        depths = [2, 2, 2, 2] if arch == "resnet18" else [3, 4, 6, 3]
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.small_stem = small_stem
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for s, depth in enumerate(depths):
            blocks = []
            for b in range(depth):
                blk = Block(cin, width << s, 2 if (s > 0 and b == 0) else 1, bottleneck)
                cin = blk.cout
                blocks.append(blk)
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.projection_head = nn.Sequential(
            nn.Linear(cin, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(), nn.Linear(hidden_mlp, feat_dim))
        self.prototypes = nn.Linear(feat_dim, prototypes, bias=False)

    def backbone(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.small_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@torch.no_grad()
def sinkhorn(scores, eps, iters):
    q = torch.exp(scores / eps).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).t()


def run_case(net, crops, meta):
    """One training-mode forward of all crops (backbone per run of equal resolution) + loss + backward."""
    bs = int(meta["batch"])
    assign = [int(a) for a in meta["crops_for_assign"].split(",")]
    eps, iters, temp = float(meta["epsilon"]), int(meta["iterations"]), float(meta["temperature"])
    feats, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
            end += 1
        feats.append(net.backbone(torch.cat(crops[start:end])))
        start = end
    z = F.normalize(net.projection_head(torch.cat(feats)), dim=1)
    scores = net.prototypes(z)
    loss = 0
    for a in assign:
        q = sinkhorn(scores[a * bs:(a + 1) * bs].detach(), eps, iters)
        sub = 0
        for v in range(len(crops)):
            if v != a:
                sub = sub - torch.mean(torch.sum(q * F.log_softmax(scores[v * bs:(v + 1) * bs] / temp, dim=1), dim=1))
        loss = loss + sub / (len(crops) - 1)
    loss = loss / len(assign)
    net.zero_grad()
    loss.backward()
    return z, scores, loss


def relu_masks(net, crops):
    """Every decision of one training-mode forward: the sign of each ReLU input and the argmax of each
    max-pool window (to find float32 flips)."""
    masks = []
    relu, pool = F.relu, F.max_pool2d

    def recording_relu(x, *a, **k):
        masks.append((x > 0).flatten().long())
        return relu(x, *a, **k)

    def recording_pool(x, *a, **k):
        out, idx = F.max_pool2d_with_indices(x, *a, **k)
        masks.append(idx.flatten())
        return out

    F.relu, F.max_pool2d = recording_relu, recording_pool
    try:
        state = {k: v.clone() for k, v in net.state_dict().items()}
        run_case_forward(net, crops)
        net.load_state_dict(state)
    finally:
        F.relu, F.max_pool2d = relu, pool
    return torch.cat(masks)


def run_case_forward(net, crops):
    start = 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
            end += 1
        net.backbone(torch.cat(crops[start:end]))
        start = end


def make_case(path, arch, width, small_stem, in_channels, crops_spec, batch, hidden, feat, protos, seed):
    """Writes the first case, from `seed` on, whose float32 forward keeps every ReLU mask and max-pool
    choice of the float64 one: a single flipped decision changes a whole channel's gradient (by chance,
    in any float32 implementation), which would make the case test float32 luck instead of correctness."""
    for s in range(seed, seed + 50):
        if _make_case(path, arch, width, small_stem, in_channels, crops_spec, batch, hidden, feat, protos, s):
            return
    raise SystemExit(f"{path}: no seed without float32 decision flips")


def _make_case(path, arch, width, small_stem, in_channels, crops_spec, batch, hidden, feat, protos, seed):
    torch.manual_seed(seed)
    net = SwavNet(arch, width, small_stem, in_channels, hidden, feat, protos).double()
    with torch.no_grad():  # non-trivial BN parameters and statistics, unit-norm prototypes
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        net.prototypes.weight.copy_(F.normalize(net.prototypes.weight, dim=1))
    sizes = []
    for part in crops_spec.split(","):
        n, s = part.split("x")
        sizes += [int(s)] * int(n)
    crops = [torch.randn(batch, in_channels, s, s, dtype=torch.float64) for s in sizes]
    net.train()
    m64 = relu_masks(net, crops)
    net32 = SwavNet(arch, width, small_stem, in_channels, hidden, feat, protos)
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    net32.train()
    m32 = relu_masks(net32, [c.float() for c in crops])
    flips = int((m64 != m32).sum())
    if flips:
        print(f"seed {seed}: {flips} ReLU / max-pool decisions differ in float32, trying the next seed")
        return False
    meta = dict(kind="swav_model", arch=arch, width=str(width), small_stem="1" if small_stem else "0",
                crops=crops_spec, batch=str(batch), hidden_mlp=str(hidden), feat_dim=str(feat),
                prototypes=str(protos), temperature="0.1", epsilon="0.05", iterations="3",
                crops_for_assign="0,1", bn_momentum="0.1", bn_eps="1e-05")
    out = {}
    for name, t in list(net.state_dict().items()):
        if not name.endswith("num_batches_tracked"):
            out["param." + name] = t.float().contiguous()
    for i, c in enumerate(crops):
        out[f"input.crop{i}"] = c.float().contiguous()
    net.eval()
    with torch.no_grad():
        out["expect.eval_features"] = net.backbone(crops[0]).float()
    net.train()
    z, scores, loss = run_case(net, crops, meta)
    out["expect.embedding"] = z.detach().float()
    out["expect.scores"] = scores.detach().float()
    out["expect.loss"] = loss.detach().float().reshape(1)
    for name, p in net.named_parameters():
        out["expect.grad." + name] = p.grad.float().contiguous()
    for name, t in net.state_dict().items():
        if "running" in name:
            out["expect.after." + name] = t.float().contiguous()
    meta["seed"] = str(seed)
    save_file(out, path, metadata=meta)
    print("wrote", path, "seed", seed)
    return True


def float32_errors(path):
    """Relative error of PyTorch's own float32 run of a swav_model case, per expected tensor."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    if meta.get("kind") != "swav_model":
        return None
    t = load_file(path)
    width = int(meta.get("width", "64"))
    arch = meta["arch"]
    in_ch = t["input.crop0"].shape[1]
    net = SwavNet(arch, width, meta.get("small_stem", "0") == "1", in_ch, int(meta["hidden_mlp"]),
                  int(meta["feat_dim"]), int(meta["prototypes"]))
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")}, strict=False)
    net.float().train()
    crops = [t[f"input.crop{i}"] for i in range(sum(1 for k in t if k.startswith("input.crop")))]
    z, scores, loss = run_case(net, crops, meta)

    def rel(a, b):
        a, b = a.detach().double(), b.double()
        return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float((a - b).norm())

    errs = {"expect.embedding": rel(z, t["expect.embedding"]), "expect.scores": rel(scores, t["expect.scores"]),
            "expect.loss": rel(loss.reshape(1), t["expect.loss"])}
    for name, p in net.named_parameters():
        errs["expect.grad." + name] = rel(p.grad, t["expect.grad." + name])
    return {"loss": float(t["expect.loss"][0]), "errors": errs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="swav-reference/cases")
    ap.add_argument("--float32", nargs="*", help="model cases whose PyTorch float32 errors to print")
    a = ap.parse_args()
    if a.float32 is None:
        make_case(f"{a.out}/swav_model_small_0.safetensors", "resnet18", 8, True, 1, "2x16,2x8", 4, 32, 16, 20, 0)
        make_case(f"{a.out}/swav_model_small_1.safetensors", "resnet50", 8, False, 3, "2x48,2x32", 8, 32, 16, 20, 1)
        return
    for path in a.float32:
        res = float32_errors(path)
        if res is None:
            continue
        for name, err in sorted(res["errors"].items(), key=lambda kv: -kv[1]):
            print(f"{os.path.basename(path)} {name:60s} {err:.2e}")


if __name__ == "__main__":
    sys.exit(main())
