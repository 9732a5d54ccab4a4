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

The first row after the baselines is the default call, supcon_loss(z, labels, negative_only) with
no options (chunk_size="auto": the path and chunk chosen by size and device, as supcon_loss's
docstring says; the line names the choice), and its ratio to the baseline is printed again last,
for time and for memory. chunk_size=None is the plain path, an int the chunked path.

The fused path (fused=True, FlexAttention) has a backward only on CUDA, where it runs compiled:
there it is timed forward + backward like the others (its first call compiles, outside the timing).
On the CPU FlexAttention has no backward and runs uncompiled, materialising the (M, N) scores, so
only its forward is timed there, and that time says nothing about the GPU kernel.

Run:   python benchmarks/bench_loss.py                # CPU: N = 4096 speed, N = 16384 memory
       python benchmarks/bench_loss.py --memory-n 1024 4096 16384   # memory at several N
       python benchmarks/bench_loss.py --device cuda --n 16384 --memory-n 65536
"""

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import supcon  # noqa: E402  (the default path's rule, to name its choice)
from supcon import supcon_loss, supcon_loss_spec  # noqa: E402

BASELINE = "baseline (reference-style, float masks)"
DEFAULT = "supcon_loss(z, labels) (default call)"


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


def default_choice(feats, labels, neg):
    """What supcon_loss(feats, labels, neg) with no options runs here, in words: the chunk its
    rule (supcon._auto_chunk_size) picks for M anchors of N samples, and the block's size."""
    B, V, _ = feats.shape
    _, counts = torch.unique(labels[~neg], return_counts=True)  # real images per class
    M, N = V * int(counts[counts * V > 1].sum()), B * V  # anchors: real views with a positive
    element_size = max(feats.element_size(), 4)  # half precision is computed in fp32
    c = supcon._auto_chunk_size(M, N, element_size, supcon._auto_block_bytes(feats.device))
    blocks = -(-M // c)
    return (f"chunked, chunk {c} of M={M} anchors: {blocks} block{'s' * (blocks > 1)} of "
            f"{c * N * element_size / 2**20:.1f} MiB")


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


def release_freed_memory():
    """Make the CPU's peaks comparable: glibc keeps freed blocks below its adaptive mmap
    threshold (up to 32 MiB) in the heap, so a measurement could reuse memory an earlier one
    freed and show less than it needs. With a fixed threshold of 64 KiB every larger allocation
    is mmap'd and goes back to the system when freed (M_MMAP_THRESHOLD is -3 in glibc's malloc.h;
    elsewhere nothing changes). malloc_trim(0) hands back what the heap holds free now."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    release_freed_memory()  # what earlier calls freed cannot hide this call's needs
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size
        f.write("5")
    base = current_rss_bytes()
    fn().backward()
    return peak_rss_bytes() - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n", type=int, default=4096, help="embeddings for the speed comparison")
    parser.add_argument("--memory-n", type=int, nargs="+", default=[16384],
                        help="embeddings for the memory comparison (one or more N)")
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
        BASELINE: lambda: baseline_supcon(feats, labels, neg),
        "supcon_loss_spec (the paper's form)": lambda: supcon_loss_spec(feats, labels, neg),
        DEFAULT: lambda: supcon_loss(feats, labels, neg),  # no options: chunk_size="auto"
        "supcon_loss (chunk_size=None: plain path)":
            lambda: supcon_loss(feats, labels, neg, chunk_size=None),
    }
    print(f"the default call at N={args.n}: {default_choice(feats, labels, neg)}")
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
    base = times[BASELINE]
    for k, t in times.items():
        print(f"  {k:45s} {t:9.2f} ms   speed-up x{base / t:5.2f}")
    if not fused_backward:
        t = time_it(runs[fused_name], feats, dev, args.repeats, backward=False)
        print(f"  {fused_name:45s} {t:9.2f} ms   forward only: no backward on the CPU, and "
              f"uncompiled here (the scores are materialised)")
    print(f"the default call, N={args.n}: x{base / times[DEFAULT]:.2f} the baseline's speed")

    del feats  # memory last: peak_extra_memory's mmap'd allocations would slow every path
    for n in args.memory_n:
        memory_at(n, args, dev)


def memory_at(n, args, dev):
    """Peak extra memory of one forward+backward at N = n: the default call, each chunk size,
    the fused path (CUDA), the baseline; then the default's share of the baseline's peak."""
    feats, labels, neg = make_batch(n, args.dim, dev)
    print(f"\npeak extra memory of one forward+backward, N={n}; the default call: "
          f"{default_choice(feats, labels, neg)}")
    mem = {"supcon_loss(z, labels) (default)": lambda: supcon_loss(feats, labels, neg)}
    for c in args.chunk_sizes:  # c=c: each lambda keeps its own chunk size
        mem[f"supcon_loss chunk_size={c}"] = lambda c=c: supcon_loss(feats, labels, neg,
                                                                     chunk_size=c)
    if dev == "cuda":  # on the CPU the fused path is forward-only and uncompiled: nothing to show
        mem["supcon_loss fused=True"] = lambda: supcon_loss(feats, labels, neg, fused=True)
    mem = {k: peak_extra_memory(fn, feats, dev) for k, fn in mem.items()}
    for k, m in mem.items():
        print(f"  {k:35s} {m / 2**20:10.1f} MiB")
    try:
        mem_base = peak_extra_memory(lambda: baseline_supcon(feats, labels, neg), feats, dev)
        print(f"  {'baseline':35s} {mem_base / 2**20:10.1f} MiB")
        share = mem["supcon_loss(z, labels) (default)"] / mem_base if mem_base > 0 else None
        print(f"the default call, N={n}: " + (f"{share:.3f} of the baseline's peak" if share
              is not None else "the baseline's peak is below what VmHWM resolves (a page)"))
    except torch.OutOfMemoryError:  # N x N float matrices: 4 N^2 bytes each, several alive at once
        torch.cuda.empty_cache()
        print(f"  {'baseline':35s} out of memory (one N x N fp32 matrix alone is "
              f"{4 * n ** 2 / 2**30:.0f} GiB)")


if __name__ == "__main__":
    main()
