"""
benchmarks/bench_loss.py -- speed and peak memory of supcon_loss (supcon.py, extended Eq. 2 of
Khosla et al. 2020) against a straightforward implementation of the same formula, in one process.

The baseline is written the way the widely copied SupCon reference code is: the full N x N logits,
every mask a float N x N tensor, exp, multiply by the masks, sum, log; autograd does the rest.
It has been extended in the obvious way for negative-only samples (hard-negative masking).

Measured: forward + backward, median of several repeats, at N embeddings (N/2 images x 2 views),
D = 128, 10 classes, 25% of images negative-only. Peak memory is the extra resident memory (CPU,
from /proc/self/status VmHWM) or extra allocated memory (CUDA) above what the inputs take.
Every fp32 path's loss and gradient are also compared with supcon_loss run in float64.

The fused path (fused=True, FlexAttention) has a backward only on CUDA, where it runs compiled:
there it is timed forward + backward like the others (its first call compiles, outside the timing).
On the CPU FlexAttention has no backward and runs uncompiled, materialising the (M, N) scores, so
only its forward is timed there, and that time says nothing about the GPU kernel.

Run:   python benchmarks/bench_loss.py                # CPU: N = 4096 speed, N = 16384 memory
       python benchmarks/bench_loss.py --device cuda --n 16384 --memory-n 65536
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from supcon import supcon_loss, supcon_loss_spec  # noqa: E402


def baseline_supcon(features, labels, negative_only, temperature=0.1):
    """Reference-style SupCon with float masks; negative-only samples with same-class masking."""
    B, V, D = features.shape
    z = F.normalize(torch.cat(torch.unbind(features, dim=1), dim=0), dim=1)  # (N, D) view-major
    labels, neg = labels.repeat(V), negative_only.repeat(V).float()  # (N,)
    N = z.shape[0]
    logits = z @ z.T / temperature  # (N, N)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # for numerical stability
    same = (labels[:, None] == labels[None, :]).float()  # (N, N)
    not_self = 1.0 - torch.eye(N, device=z.device)
    real = 1.0 - neg
    positive = same * not_self * real[None, :] * real[:, None]
    contrast = not_self * (real[None, :] + neg[None, :] * same)
    exp_logits = torch.exp(logits) * contrast
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    num_positives = positive.sum(1)
    valid = num_positives > 0
    mean_log_prob_pos = (positive * log_prob).sum(1)[valid] / num_positives[valid]
    return -mean_log_prob_pos.mean()


def make_batch(n, dim, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = n // 2
    feats = torch.randn(B, 2, dim, generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    neg = torch.rand(B, generator=g) < 0.25
    return feats.to(device).requires_grad_(), labels.to(device), neg.to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, feats, device, repeats, backward=True):
    times = []
    for _ in range(repeats + 1):  # the first call warms up (and compiles the fused path)
        feats.grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = fn()
        if backward:
            loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000.0  # ms


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


def peak_extra_memory(fn, feats, device):
    """Extra memory (bytes) that one forward+backward needs above the current footprint."""
    feats.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size
        f.write("5")
    base = current_rss_bytes()
    fn().backward()
    return peak_rss_bytes() - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n", type=int, default=4096, help="embeddings for the speed comparison")
    parser.add_argument("--memory-n", type=int, default=16384, help="embeddings for the memory comparison")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 4096], help="chunked paths to time")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"machine: {dev} ({name}); torch {torch.__version__}")

    # ---- speed at N = args.n
    feats, labels, neg = make_batch(args.n, args.dim, dev)
    runs = {
        "baseline (reference-style, float masks)": lambda: baseline_supcon(feats, labels, neg),
        "supcon_loss_spec (the paper's form)": lambda: supcon_loss_spec(feats, labels, neg),
        "supcon_loss (default: plain path)": lambda: supcon_loss(feats, labels, neg),
    }
    for c in args.chunk_sizes:  # c=c: each lambda keeps its own chunk size
        runs[f"supcon_loss (chunk_size={c})"] = lambda c=c: supcon_loss(feats, labels, neg, chunk_size=c)
    fused_name = "supcon_loss (fused=True, FlexAttention)"
    runs[fused_name] = lambda: supcon_loss(feats, labels, neg, fused=True)
    fused_backward = dev == "cuda"  # FlexAttention's backward exists on CUDA only

    # every path must agree with supcon_loss in float64: same value, same gradient (chunked, so
    # that large N fits; the tests hold it equal to the plain path to 1e-12)
    x64 = feats.detach().double().requires_grad_()
    loss64 = supcon_loss(x64, labels, neg, chunk_size=1024)
    loss64.backward()
    value64, grad64 = loss64.item(), x64.grad
    del x64, loss64
    print(f"\nN={args.n}, D={args.dim}, 10 classes, 25% negative-only; each fp32 path against "
          f"supcon_loss in float64 (loss {value64:.6f}):")
    for k, fn in runs.items():
        feats.grad = None
        loss = fn()
        value_error = abs(loss.item() - value64) / abs(value64)
        if k == fused_name and not fused_backward:
            print(f"  {k:45s} loss rel. error {value_error:.1e}   gradient: none on the CPU")
            continue
        loss.backward()
        grad_error = ((feats.grad.double() - grad64).abs().max() / grad64.abs().max()).item()
        print(f"  {k:45s} loss rel. error {value_error:.1e}   gradient max error {grad_error:.1e} "
              f"of the largest entry")
    del grad64

    print(f"\nforward+backward, median of {args.repeats}:")
    times = {k: time_it(fn, feats, dev, args.repeats) for k, fn in runs.items()
             if k != fused_name or fused_backward}
    base = times["baseline (reference-style, float masks)"]
    for k, t in times.items():
        print(f"  {k:45s} {t:9.2f} ms   speed-up x{base / t:5.2f}")
    if not fused_backward:
        t = time_it(runs[fused_name], feats, dev, args.repeats, backward=False)
        print(f"  {fused_name:45s} {t:9.2f} ms   forward only: no backward on the CPU, and "
              f"uncompiled here (the scores are materialised)")

    # ---- memory at N = args.memory_n
    del feats
    feats, labels, neg = make_batch(args.memory_n, args.dim, dev)
    print(f"\npeak extra memory of one forward+backward, N={args.memory_n}")
    for c in args.chunk_sizes:
        mem_chunk = peak_extra_memory(lambda: supcon_loss(feats, labels, neg, chunk_size=c), feats, dev)
        print(f"  supcon_loss chunk_size={c:<6d}  {mem_chunk / 2**20:10.1f} MiB")
    if dev == "cuda":  # on the CPU the fused path is forward-only and uncompiled: nothing to show
        mem_fused = peak_extra_memory(lambda: supcon_loss(feats, labels, neg, fused=True), feats, dev)
        print(f"  supcon_loss fused=True         {mem_fused / 2**20:10.1f} MiB")
    try:
        mem_base = peak_extra_memory(lambda: baseline_supcon(feats, labels, neg), feats, dev)
        print(f"  baseline                        {mem_base / 2**20:10.1f} MiB   "
              f"(chunk_size={args.chunk_sizes[-1]} needs {mem_chunk / mem_base:.3f} of it)")
    except torch.OutOfMemoryError:  # N x N float matrices: 4 N^2 bytes each, several alive at once
        torch.cuda.empty_cache()
        print(f"  baseline                        out of memory (one N x N fp32 matrix alone is "
              f"{4 * args.memory_n ** 2 / 2**30:.0f} GiB)")


if __name__ == "__main__":
    main()
