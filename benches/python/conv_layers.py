"""PyTorch times of single convolution layers (forward, weight gradient, data gradient), channels-last
fp32 on the CPU, the best of `--reps` runs after one untimed run. Prints one JSON line
{"torch": version, "seconds": [[fwd, wgrad, dgrad], ...]} in the order of `--shapes`. Used by
`cargo xtask bench conv --python <python>`.

    python benches/python/conv_layers.py --threads 2 --shapes '[{"n": 16, "h": 56, "w": 56, "cin": 64,
        "cout": 64, "k": 3, "stride": 1, "pad": 1, "first": false}]'
"""
import argparse
import json
import time

import torch


def best_of(reps, f):
    f()
    best = float("inf")
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--shapes", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = []
    with torch.no_grad():
        for s in json.loads(a.shapes):
            n, h, w, cin, cout, k = s["n"], s["h"], s["w"], s["cin"], s["cout"], s["k"]
            stride, pad = (s["stride"], s["stride"]), (s["pad"], s["pad"])
            x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
            wt = torch.randn(cout, cin, k, k).contiguous(memory_format=torch.channels_last)
            y = torch.nn.functional.conv2d(x, wt, None, stride, pad)
            dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)

            def backward(mask):
                return torch.ops.aten.convolution_backward(
                    dy, x, wt, None, stride, pad, (1, 1), False, (0, 0), 1, mask)

            fwd = best_of(a.reps, lambda: torch.nn.functional.conv2d(x, wt, None, stride, pad))
            wgrad = best_of(a.reps, lambda: backward([False, True, False]))
            dgrad = 0.0 if s["first"] else best_of(a.reps, lambda: backward([True, False, False]))
            out.append([fwd, wgrad, dgrad])
    print(json.dumps({"torch": torch.__version__, "seconds": out}))


if __name__ == "__main__":
    main()
