"""PyTorch baseline of one SwAV training step (official semantics: torchvision ResNet, head
Linear-BN-ReLU-Linear, L2 normalisation, prototypes, Sinkhorn eps 0.05 x 3, swapped loss over crops
[0, 1], temperature 0.1), SGD with momentum. Prints one JSON line with the median step time and the
peak resident memory (and, on CUDA, the peak of allocated device memory). Used by
`cargo xtask bench step --python <python>`.

    python benches/python/step.py --arch resnet18 --small-stem --crops 2x28,4x16 --batch 64 --threads 2
    python benches/python/step.py --arch resnet50 --crops 2x224,6x96 --batch 64 --device cuda --precision bf16

bf16 is autocast (convolutions and matmuls in bf16, the rest fp32) with channels_last activations and
weights, PyTorch's fastest eager configuration (on the CPU, oneDNN's bf16 kernels where the CPU has
AVX512_BF16 or AMX); Sinkhorn and the loss stay fp32.
"""
import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def sinkhorn(scores, eps=0.05, iters=3):
    with torch.no_grad():
        q = torch.exp(scores / eps).t()
        q /= q.sum()
        k, b = q.shape
        for _ in range(iters):
            q /= q.sum(dim=1, keepdim=True)
            q /= k
            q /= q.sum(dim=0, keepdim=True)
            q /= b
        return (q * b).t()


class Net(nn.Module):
    def __init__(self, arch, small_stem, channels, hidden, feat, k):
        super().__init__()
        backbone = getattr(torchvision.models, arch)()
        width = backbone.conv1.out_channels
        if small_stem:
            backbone.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
            backbone.maxpool = nn.Identity()
        elif channels != 3:
            backbone.conv1 = nn.Conv2d(channels, width, 7, 2, 3, bias=False)
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.projection_head = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, feat))
        self.prototypes = nn.Linear(feat, k, bias=False)

    def forward(self, groups):
        z = F.normalize(self.projection_head(torch.cat([self.backbone(g) for g in groups])), dim=1)
        return z, self.prototypes(z)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--small-stem", action="store_true")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--crops", default="2x28,4x16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--feat", type=int, default=128)
    ap.add_argument("--prototypes", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    dev = torch.device(a.device)
    fmt = torch.channels_last if a.precision == "bf16" else torch.contiguous_format
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    crops = [tuple(int(v) for v in c.split("x")) for c in a.crops.split(",")]
    ncrops = sum(n for n, _ in crops)
    net = Net(a.arch, a.small_stem, a.channels, a.hidden, a.feat, a.prototypes).to(dev, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    groups = [torch.randn(n * a.batch, a.channels, s, s, device=dev).contiguous(memory_format=fmt) for n, s in crops]
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16")
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            net.prototypes.weight.copy_(F.normalize(net.prototypes.weight, dim=1))
        with autocast:
            _, scores = net(groups)
        scores = scores.float()
        loss = 0
        for c in (0, 1):
            q = sinkhorn(scores[c * a.batch:(c + 1) * a.batch].detach())
            sub = 0
            for v in range(ncrops):
                if v != c:
                    sub = sub - torch.mean(torch.sum(q * F.log_softmax(scores[v * a.batch:(v + 1) * a.batch] / 0.1, dim=1), dim=1))
            loss = loss + sub / (ncrops - 1)
        opt.zero_grad(set_to_none=True)
        (loss / 2).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {"step_ms": times[len(times) // 2] * 1e3, "threads": torch.get_num_threads(),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__}
    if cuda:
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["device_name"] = torch.cuda.get_device_name(dev)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
