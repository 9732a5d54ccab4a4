"""
benchmarks/gpu_check.py -- the checks only a GPU can settle, in one script, ready before a GPU is
lent: run it in one device call and keep its output in benchmarks/results/.

Prints one line per check, "PASS", "FAIL" or "SKIP" (with the reason), and exits 1 on any FAIL:

  Stable Diffusion at the precision a GPU runs it, in fp16 (dafusion.py's default on CUDA) and
  bf16, through dafusion.py's own path (dafusion.generate): textual inversion (--ti-steps, 20 by
  default) for two classes, then img2img, then inpainting inside object masks. Checked: the
  learned vectors are finite, every image is finite (generate refuses non-finite pixels) and
  none is constant. On CUDA the pipeline has Stable Diffusion v1's architecture with random
  weights (benchmarks/bench_generate.py's "full" sizes, 512 px); on the CPU the tiny pipeline of
  tests/tiny_sd.py (16 px).
  The fused SupCon loss (supcon_loss(fused=True), FlexAttention): its loss and gradient against
  the chunked path's at N = 4096 embeddings (fp32 and bf16 inputs); its forward + backward time
  against the chunked path's at N = 16,384; its peak memory at N = 65,536. On the CPU N is 512,
  2048 and 4096, and FlexAttention has no backward there: the gradient and memory lines say SKIP
  and the forward is compared and timed instead.

Only the device differs between the two runs; tests/test_gpu_check.py runs the CPU version.

Run:  python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check_h100.txt
      python benchmarks/gpu_check.py --device cpu
"""

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import dafusion  # noqa: E402
import data  # noqa: E402
from bench_generate import SIZES  # noqa: E402  (Stable Diffusion v1's sizes)
from bench_loss import make_batch, peak_extra_memory, time_it  # noqa: E402
from supcon import supcon_loss  # noqa: E402
from tiny_sd import build_pipeline_folder, build_tiny_pipeline  # noqa: E402

# N of the loss checks: (gradient, time, memory)
LOSS_N = {"cuda": (4096, 16384, 65536), "cpu": (512, 2048, 4096)}
LINES = []  # every line printed, for --out


def say(status, name, detail):
    line = f"{status} {name}: {detail}"
    LINES.append(line)
    print(line, flush=True)


def check(name, fn):
    """Run one check; fn returns its detail (PASS) or raises (FAIL, with the error's last line)."""
    t0 = time.perf_counter()
    try:
        detail = fn()
    except Exception as error:  # any failure is one FAIL line; the traceback goes to stderr
        traceback.print_exc()
        say("FAIL", name, f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
        return
    say("PASS", name, f"{detail} ({time.perf_counter() - t0:.1f} s)")


# -----------------------------------------------------------------------------
# Stable Diffusion in fp16 and bf16


def write_parts(root, size):
    """Two classes of two coloured images each, and an object mask per image."""
    rng = np.random.default_rng(0)
    for c, colour in (("red", 0), ("blue", 2)):
        os.makedirs(os.path.join(root, "parts", c))
        os.makedirs(os.path.join(root, "masks", c))
        for i in range(2):
            a = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            a[size // 4:3 * size // 4, size // 4:3 * size // 4, colour] = 230  # the "object"
            Image.fromarray(a).save(os.path.join(root, "parts", c, f"p{i}.png"))
            mask = Image.new("L", (size, size))
            mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
            mask.save(os.path.join(root, "masks", c, f"p{i}.png"))
    return os.path.join(root, "parts"), os.path.join(root, "masks")


def generation_checks(device, root, ti_steps):
    """Textual inversion, img2img and inpainting in fp16 and bf16 through dafusion.generate."""
    if device.type == "cuda":
        spec = SIZES["full"]
        model = os.path.join(root, "sd-v1-random")
        build_pipeline_folder(model, spec["text"], spec["unet"], spec["vae"], torch.float16,
                              vae_blocks=4)
        pixels = spec["pixels"]
    else:
        model, pixels = build_tiny_pipeline(os.path.join(root, "sd-tiny")), 16
    parts, masks = write_parts(root, 32)
    for dtype in ("fp16", "bf16"):
        out = os.path.join(root, f"out-{dtype}")
        argv = ["--data", parts, "--image-size", "32", "--ood-classes", "", "--val-fraction", "0",
                "--generator", "stable-diffusion", "--model", model, "--dtype", dtype,
                "--gen-device", str(device), "--ti-steps", str(ti_steps), "--num-vectors", "2",
                "--ti-batch", "2", "--per-image", "1", "--steps", "20", "--guidance", "7.5"]

        def img2img(out=out, argv=argv):
            made = dafusion.generate(dafusion.build_parser().parse_args(argv + ["--out", out]))
            vectors = learned_vectors(out)
            if not all(bool(torch.isfinite(v).all()) for v in vectors):
                raise AssertionError("non-finite learned vectors")
            return (f"{ti_steps} textual-inversion steps x 2 classes, {len(vectors)} finite "
                    f"tokens; {made} images, {varied(out, pixels)}")

        def inpaint(out=out, argv=argv):
            again = out + "-inpaint"
            os.makedirs(again)
            os.symlink(os.path.join(out, "embeddings"), os.path.join(again, "embeddings"))
            made = dafusion.generate(dafusion.build_parser().parse_args(
                argv + ["--out", again, "--masks", masks, "--kinds", "near_ood"]))
            return f"{made} images inside the masks, {varied(again, pixels)}"

        check(f"stable diffusion {dtype}: textual inversion + img2img", img2img)
        check(f"stable diffusion {dtype}: inpainting", inpaint)


def learned_vectors(out):
    """The tokens textual inversion saved in OUT/embeddings, as fp32 tensors."""
    from safetensors.torch import load_file
    folder = os.path.join(out, "embeddings")
    return [t.float() for f in sorted(os.listdir(folder)) for t in
            load_file(os.path.join(folder, f)).values()]


def varied(out, pixels):
    """'every image finite and not constant', or AssertionError."""
    found = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
             if f.endswith(".png") and "contact_sheet" not in f]
    for path in found:
        with Image.open(path) as image:
            a = np.asarray(image, dtype=np.float64)
        if a.shape[:2] != (pixels, pixels) or a.std() <= 1.0:
            raise AssertionError(f"{path}: {a.shape} with std {a.std():.2f} (constant?)")
    return f"all {len(found)} at {pixels} px finite and not constant"


# -----------------------------------------------------------------------------
# The fused SupCon loss


def loss_checks(device):
    n_grad, n_time, n_memory = LOSS_N[device.type]
    dev, cuda = device.type, device.type == "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        name = f"fused loss, N = {n_grad}, {str(dtype).split('.')[-1]} inputs"
        feats, labels, neg = make_batch(n_grad, 128, dev)
        feats = feats.detach().to(dtype).requires_grad_()

        def compare(feats=feats, labels=labels, neg=neg):
            chunked = supcon_loss(feats, labels, neg, chunk_size=1024)
            fused = supcon_loss(feats, labels, neg, fused=True)
            if abs(fused.item() - chunked.item()) > 1e-4 * abs(chunked.item()):
                raise AssertionError(f"loss {fused.item():.6f} vs chunked {chunked.item():.6f}")
            detail = f"loss {fused.item():.6f} = chunked {chunked.item():.6f}"
            if not cuda:
                return detail
            g_chunked, = torch.autograd.grad(chunked, feats)
            g_fused, = torch.autograd.grad(fused, feats)
            error = (g_fused.float() - g_chunked.float()).abs().max() / g_chunked.float().abs().max()
            if not error < 1e-3:
                raise AssertionError(f"gradient differs by {error:.2e} of its largest entry")
            return detail + f"; gradient within {error:.1e} of the largest entry"

        check(name, compare)
        if not cuda:
            say("SKIP", f"{name}, gradient", "FlexAttention has no backward on the CPU; the "
                "forward is compared above")
    feats, labels, neg = make_batch(n_time, 128, dev)

    def timing():
        chunked = time_it(lambda: supcon_loss(feats, labels, neg, chunk_size=n_time), feats, dev,
                          5, backward=cuda)
        fused = time_it(lambda: supcon_loss(feats, labels, neg, fused=True), feats, dev, 5,
                        backward=cuda)
        what = "forward + backward" if cuda else "forward only (uncompiled on the CPU)"
        return (f"{what}, median of 5: fused {fused:.2f} ms, chunked (chunk_size={n_time}) "
                f"{chunked:.2f} ms, ratio {chunked / fused:.2f}x")

    check(f"fused loss time, N = {n_time}", timing)
    feats, labels, neg = make_batch(n_memory, 128, dev)

    def memory():
        chunked = peak_extra_memory(lambda: supcon_loss(feats, labels, neg, chunk_size=1024),
                                    feats, dev)
        fused = peak_extra_memory(lambda: supcon_loss(feats, labels, neg, fused=True), feats, dev)
        return (f"peak extra memory of one forward + backward: fused {fused / 2**20:,.0f} MiB, "
                f"chunked (chunk_size=1024) {chunked / 2**20:,.0f} MiB")

    if cuda:
        check(f"fused loss memory, N = {n_memory}", memory)
    else:
        say("SKIP", f"fused loss memory, N = {n_memory}", "FlexAttention has no backward on the CPU")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu), cuda or cpu")
    p.add_argument("--ti-steps", type=int, default=20, help="textual-inversion steps per class")
    p.add_argument("--out", default=None, help="also write the lines to this file")
    args = p.parse_args(argv)
    LINES.clear()
    device = data.pick_device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    say("INFO", "machine", f"{machine}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as root:
        generation_checks(device, root, args.ti_steps)
    loss_checks(device)
    if args.out:
        data.write_text(args.out, "\n".join(LINES) + "\n")
    return 1 if any(line.startswith("FAIL") for line in LINES) else 0


if __name__ == "__main__":
    sys.exit(main())
