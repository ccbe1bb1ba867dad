"""Whole-iteration reference cases (kind = swav_train) for swav-rs: float64 PyTorch, stored as float32.

    /work/venv-torch/bin/python swav-reference/scripts/make_step_cases.py OUT_DIR SEED NAME [VARIANT]
        writes OUT_DIR/NAME.safetensors from the first seed >= SEED whose float32 run (PyTorch, from
        the stored float32 inputs) takes every ReLU and max-pool decision of the float64 one in every
        iteration; the metadata records the seed and the variant
    /work/venv-torch/bin/python swav-reference/scripts/make_step_cases.py --float32 CASE.safetensors ...
        prints PyTorch's own float32 error on every tensor of the cases, judged as the README says

    # the shipped cases (run from the repository root; CPU, a few seconds each):
    P=/work/venv-torch/bin/python; S=swav-reference/scripts/make_step_cases.py; C=swav-reference/cases
    $P $S $C 1 swav_train_sgd sgd             # seed 1 flips a ReLU in float32: seed 2 is kept
    $P $S $C 2 swav_train_assign0 assign0
    $P $S $C 3 swav_train_gray gray
    $P $S $C 4 swav_train_multires multires
    # swav_train_0 is /work/shared/reference/swav_train_0.safetensors, made by this script's original
    # (variant `a`, seed 0) with another PyTorch version: regenerating gives other random draws.

Needs torch (1.13 was used) and safetensors. The format is documented in swav-reference/cases/README.md
(and /work/shared/reference/README.md). Variant `a` is the script as it came with the shared reference
material; the other variants (table VARIANTS) only change settings, the algorithm is untouched; the
decision filter and --float32 were added here.

Per iteration, following main_swav.py train(): prototypes L2-normalised -> forward (backbone once per
resolution group, head on all) -> for each crop in crops_for_assign: queue scores with the current
prototypes prepended when the queue is full (last row non-zero), sinkhorn, keep last `batch` rows, THEN
push the crop's embeddings (FIFO) -> swapped loss -> backward -> prototype grads dropped while
iteration < freeze_prototypes_niters -> LARC(clip=False) over SGD(momentum, weight decay) on every
parameter (or plain SGD with weight decay when lars = false).
"""
import sys, os
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VARIANTS = {  # variant: width, small_stem, in_ch, hidden, feat, K, crops, batch, steps, queue rows, freeze, eps, lars, assign
    # the shared example: queue full after 2 pushes (used from iteration 2), prototypes frozen for 2 of 4
    "a": dict(width=8, small_stem=True, in_ch=3, hidden=32, feat=16, K=24, crops=[(2, 32), (2, 16)], batch=8,
              steps=4, queue=16, freeze=2, eps=0.05, lars=True, assign=[0, 1]),
    # plain SGD (weight decay 1e-4 in the gradient, no LARC) and a single-Linear head (hidden_mlp = 0)
    "sgd": dict(width=4, small_stem=True, in_ch=3, hidden=0, feat=8, K=12, crops=[(2, 16), (2, 8)], batch=8,
                steps=3, queue=0, freeze=1, eps=0.05, lars=False, assign=[0, 1]),
    # one assigned crop (its queue fills after 2 pushes), a head without BatchNorm (projection_head.0 / .2)
    "assign0": dict(width=4, small_stem=True, in_ch=3, hidden=16, head_bn=False, feat=8, K=12,
                    crops=[(2, 16), (1, 8)], batch=8, steps=4, queue=16, freeze=1, eps=0.05, lars=True, assign=[0]),
    # grayscale input through the standard stem (7x7/2 conv + 3x3/2 max-pool)
    "gray": dict(width=4, small_stem=False, in_ch=1, hidden=16, feat=8, K=12, crops=[(2, 32), (2, 16)], batch=6,
                 steps=3, queue=0, freeze=2, eps=0.05, lars=True, assign=[0, 1]),
    # three resolutions over six iterations: queue on from iteration 3, prototypes released after 3
    "multires": dict(width=4, small_stem=True, in_ch=3, hidden=16, feat=8, K=16, crops=[(2, 20), (2, 12), (2, 8)],
                     batch=6, steps=6, queue=18, freeze=3, eps=0.05, lars=True, assign=[0, 1]),
}
T_, ITERS, MOM, TRUST = 0.1, 3, 0.9, 0.001


class Block(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); s.bn1 = nn.BatchNorm2d(cout)
        s.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); s.bn2 = nn.BatchNorm2d(cout)
        s.downsample = None
        if stride != 1 or cin != cout:
            s.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(s, x):
        idt = x if s.downsample is None else s.downsample(x)
        return F.relu(s.bn2(s.conv2(F.relu(s.bn1(s.conv1(x))))) + idt)


class Net(nn.Module):  # torchvision ResNet-18 names, base width W, optional small stem (3x3/1, no max-pool)
    def __init__(s, V):
        super().__init__()
        W = V["width"]
        s.V = V
        if V["small_stem"]:
            s.conv1 = nn.Conv2d(V["in_ch"], W, 3, 1, 1, bias=False)
        else:
            s.conv1 = nn.Conv2d(V["in_ch"], W, 7, 2, 3, bias=False)
        s.bn1 = nn.BatchNorm2d(W)
        cin = W
        for i, c in enumerate((W, 2 * W, 4 * W, 8 * W)):
            st = 1 if i == 0 else 2
            setattr(s, f"layer{i + 1}", nn.Sequential(Block(cin, c, st), Block(c, c, 1))); cin = c
        if V["hidden"] and V["head_bn"]:
            s.projection_head = nn.Sequential(nn.Linear(8 * W, V["hidden"]), nn.BatchNorm1d(V["hidden"]), nn.ReLU(True), nn.Linear(V["hidden"], V["feat"]))
        elif V["hidden"]:
            s.projection_head = nn.Sequential(nn.Linear(8 * W, V["hidden"]), nn.ReLU(True), nn.Linear(V["hidden"], V["feat"]))
        else:
            s.projection_head = nn.Linear(8 * W, V["feat"])
        s.prototypes = nn.Linear(V["feat"], V["K"], bias=False)
        for m in s.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):  # non-trivial affine so their grads matter
                nn.init.uniform_(m.weight, 0.5, 1.5); nn.init.uniform_(m.bias, -0.2, 0.2)
    def backbone(s, x):
        x = F.relu(s.bn1(s.conv1(x)))
        if not s.V["small_stem"]:
            x = F.max_pool2d(x, 3, 2, 1)
        for i in range(1, 5):
            x = getattr(s, f"layer{i}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    def forward(s, crops):  # one backbone pass per run of equal resolution, head on the concatenation
        feats, i = [], 0
        for n, _ in s.V["crops"]:
            feats.append(s.backbone(torch.cat(crops[i:i + n]))); i += n
        z = F.normalize(s.projection_head(torch.cat(feats)), dim=1, p=2)
        return z, s.prototypes(z)


@torch.no_grad()
def sinkhorn(out, eps):
    Q = torch.exp(out / eps).t(); Bq, K = Q.shape[1], Q.shape[0]; Q /= torch.sum(Q)
    for _ in range(ITERS):
        Q /= torch.sum(Q, dim=1, keepdim=True); Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True); Q /= Bq
    return (Q * Bq).t()


def train(net, V, lrs, wd, step_crops):
    """The iterations of main_swav.py train() on the crops of each step; returns the expect.* tensors."""
    B, ncrops, t = V["batch"], sum(n for n, _ in V["crops"]), {}
    opt = torch.optim.SGD(net.parameters(), lr=lrs[0], momentum=MOM, weight_decay=wd)
    queue = torch.zeros(len(V["assign"]), V["queue"], V["feat"]) if V["queue"] else None
    use_the_queue = False
    for it, crops in enumerate(step_crops):
        for g in opt.param_groups:
            g["lr"] = lrs[it]
        with torch.no_grad():
            w = net.prototypes.weight.data.clone(); w = F.normalize(w, dim=1, p=2); net.prototypes.weight.copy_(w)
        embedding, output = net(crops)
        embedding = embedding.detach()
        loss = 0
        for i, crop_id in enumerate(V["assign"]):
            with torch.no_grad():
                out = output[B * crop_id: B * (crop_id + 1)].detach()
                if queue is not None:
                    if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                        use_the_queue = True
                        out = torch.cat((torch.mm(queue[i], net.prototypes.weight.t()), out))
                    queue[i, B:] = queue[i, :-B].clone()
                    queue[i, :B] = embedding[crop_id * B: (crop_id + 1) * B]
                q = sinkhorn(out, V["eps"])[-B:]
            subloss = 0
            for v in [x for x in range(ncrops) if x != crop_id]:
                x = output[B * v: B * (v + 1)] / T_
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (ncrops - 1)
        loss /= len(V["assign"])
        t[f"expect.step{it}.loss"] = loss.detach().reshape(1)
        opt.zero_grad()
        loss.backward()
        if it < V["freeze"]:
            for n_, p in net.named_parameters():
                if "prototypes" in n_:
                    p.grad = None
        with torch.no_grad():  # apex LARC, clip=False
            if V["lars"]:
                for g in opt.param_groups:
                    g_wd = g["weight_decay"]; g["weight_decay"] = 0
                    for p in g["params"]:
                        if p.grad is None:
                            continue
                        pn, gn = torch.norm(p.data), torch.norm(p.grad.data)
                        if pn != 0 and gn != 0:
                            lr_ = TRUST * pn / (gn + pn * g_wd + 1e-8)
                            p.grad.data += g_wd * p.data
                            p.grad.data *= lr_
        opt.step()
        if V["lars"]:
            for g in opt.param_groups:
                g["weight_decay"] = wd
    for k, v in net.state_dict().items():
        if "num_batches_tracked" not in k:
            t[f"expect.final.{k}"] = v.clone()
    for n_, p in net.named_parameters():
        st = opt.state.get(p, {})
        if "momentum_buffer" in st and st["momentum_buffer"] is not None:
            t[f"expect.final.momentum.{n_}"] = st["momentum_buffer"].clone()
    if queue is not None:
        for i in range(len(V["assign"])):
            t[f"expect.final.queue.{i}"] = queue[i].clone()
    return t


def decisions(fn):
    """Runs fn(), recording every ReLU's signs and every max-pool's argmax, in call order."""
    rec, relu, pool = [], F.relu, F.max_pool2d
    def relu_rec(x, *a, **k):
        rec.append((x > 0).flatten())
        return relu(x, *a, **k)
    def pool_rec(x, *a, **k):
        out, idx = F.max_pool2d_with_indices(x, *a, **k)
        rec.append(idx.flatten())
        return out
    F.relu, F.max_pool2d = relu_rec, pool_rec
    try:
        return fn(), rec
    finally:
        F.relu, F.max_pool2d = relu, pool


def make(out_dir, seed, name, variant):
    """Writes the first case from `seed` on whose float32 run (PyTorch, from the stored float32 inputs)
    takes every ReLU and max-pool decision of the float64 one, in every iteration: where float32
    arithmetic flips a decision, a whole channel's gradient changes in any float32 implementation, and
    the case would test float32 luck instead of correctness."""
    for s in range(seed, seed + 50):
        if _make(out_dir, s, name, variant):
            return
    raise SystemExit(f"{name}: no seed without float32 decision flips")


def _make(out_dir, seed, name, variant):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64)
    V = dict(VARIANTS[variant]); V.setdefault("head_bn", True)
    wd = 1e-6 if V["lars"] else 1e-4
    net = Net(V)
    steps = V["steps"]
    lrs = [0.05 + 0.4 * s / max(1, steps - 1) for s in range(steps)] if V["lars"] else [0.02 * (s + 1) for s in range(steps)]
    t = {f"param.{k}": v.clone() for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    step_crops = []
    for it in range(steps):
        crops = [torch.randn(V["batch"], V["in_ch"], size, size) for n, size in V["crops"] for _ in range(n)]
        for i, c in enumerate(crops):
            t[f"input.step{it}.crop{i}"] = c
        step_crops.append(crops)
    expect, d64 = decisions(lambda: train(net, V, lrs, wd, step_crops))
    t.update(expect)
    torch.set_default_dtype(torch.float32)
    net32 = Net(V)
    net32.load_state_dict({k[6:]: v.float() for k, v in t.items() if k.startswith("param.")}, strict=False)
    _, d32 = decisions(lambda: train(net32, V, lrs, wd, [[c.float() for c in cs] for cs in step_crops]))
    torch.set_default_dtype(torch.float64)
    flips = sum(int((a != b).sum()) for a, b in zip(d64, d32))
    if flips:
        print(f"{name} seed {seed}: float32 takes {flips} ReLU / max-pool decisions the other way, trying the next seed")
        return False
    meta = dict(kind="swav_train", arch="resnet18", width=V["width"], small_stem=str(V["small_stem"]).lower(),
                in_channels=V["in_ch"], hidden_mlp=V["hidden"], head_bn="true" if V["hidden"] and V["head_bn"] else "false",
                feat_dim=V["feat"], prototypes=V["K"], crops=",".join(f"{n}x{s}" for n, s in V["crops"]), batch=V["batch"],
                steps=steps, lr=",".join(repr(x) for x in lrs), temperature=T_, epsilon=V["eps"], iterations=ITERS,
                crops_for_assign=",".join(map(str, V["assign"])), freeze_prototypes_niters=V["freeze"], weight_decay=wd,
                momentum=MOM, lars=str(V["lars"]).lower(), trust_coefficient=TRUST, queue_length=V["queue"],
                bn_momentum=0.1, bn_eps=1e-5, seed=seed, variant=variant)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in t.items()}, f"{out_dir}/{name}.safetensors",
              metadata={k: str(v) for k, v in meta.items()})
    print(name, "seed", seed, len(t), "tensors", {i: round(float(t[f"expect.step{i}.loss"]), 5) for i in range(steps)})
    return True


def float32_errors(path):
    """PyTorch's own float32 run of a case (from its float32-stored inputs), judged as the README says: the
    relative L2 error of every loss, update (final - initial), momentum buffer and queue."""
    meta = safe_open(path, "pt").metadata()
    t = load_file(path)
    torch.set_default_dtype(torch.float32)
    crops = [(int(n), int(s)) for n, s in (c.split("x") for c in meta["crops"].split(","))]
    V = dict(width=int(meta["width"]), small_stem=meta["small_stem"] == "true", in_ch=int(meta["in_channels"]),
             hidden=int(meta["hidden_mlp"]), head_bn=meta["head_bn"] == "true" or int(meta["hidden_mlp"]) == 0,
             feat=int(meta["feat_dim"]), K=int(meta["prototypes"]), crops=crops, batch=int(meta["batch"]),
             steps=int(meta["steps"]), queue=int(meta["queue_length"]), freeze=int(meta["freeze_prototypes_niters"]),
             eps=float(meta["epsilon"]), lars=meta["lars"] == "true",
             assign=[int(a) for a in meta["crops_for_assign"].split(",")])
    net = Net(V)
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")}, strict=False)
    ncrops = sum(n for n, _ in crops)
    step_crops = [[t[f"input.step{s}.crop{i}"] for i in range(ncrops)] for s in range(V["steps"])]
    got = train(net, V, [float(x) for x in meta["lr"].split(",")], float(meta["weight_decay"]), step_crops)
    errors = {}
    for k, want in t.items():
        if not k.startswith("expect."):
            continue
        g, w = got[k].double(), want.double()
        if k.startswith("expect.final.") and not k.startswith(("expect.final.momentum.", "expect.final.queue.")):
            init = t["param." + k[len("expect.final."):]].double()
            g, w = g - init, w - init
        errors[k] = float((g - w).norm() / w.norm()) if float(w.norm()) > 0 else float((g - w).norm())
    return errors


if __name__ == "__main__":
    if sys.argv[1] == "--float32":
        for path in sys.argv[2:]:
            for k, e in sorted(float32_errors(path).items(), key=lambda kv: -kv[1]):
                print(f"{os.path.basename(path)} {k:60s} {e:.2e}")
    else:
        make(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "a")
