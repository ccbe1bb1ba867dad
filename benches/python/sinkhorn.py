"""PyTorch baseline for `cargo xtask bench sinkhorn`: SwAV's distributed_sinkhorn (world size 1), eager.

Usage: python benches/python/sinkhorn.py [--shapes 256x3000,4096x3000] [--device cpu|cuda] [--threads 2]
Prints the median time per call in ms for each shape (scores uniform in [-1, 1), like cosine similarities).
"""

import argparse
import statistics
import time

import torch


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3, world_size=1):
    # The official algorithm (facebookresearch/swav, main_swav.py), without the all-reduces of world size 1.
    q = torch.exp(scores / epsilon).t()  # K x B
    b = q.shape[1] * world_size
    k = q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256x3000,4096x3000")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("PyTorch on cuda: not measured (no CUDA device)")
        return
    gen = torch.Generator().manual_seed(0)
    print(f"PyTorch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads")
    for shape in args.shapes.split(","):
        rows, k = (int(x) for x in shape.split("x"))
        scores = (torch.rand(rows, k, generator=gen) * 2 - 1).to(args.device)
        times = []
        for i in range(args.repeats + 3):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            q = sinkhorn(scores, args.epsilon, args.iterations)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append((time.perf_counter() - t) * 1e3)
        rowsum_err = (q.sum(dim=1) - 1).abs().max().item()
        print(f"{shape:<12} {args.device:<6} pytorch eager {statistics.median(times):10.3f} ms   (max |row sum - 1| {rowsum_err:.1e})")


if __name__ == "__main__":
    main()
