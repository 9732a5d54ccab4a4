"""
benchmarks/bench_generate.py -- DA-Fusion generation throughput (images per second).

1. Stable Diffusion img2img (the DA-Fusion step of dafusion.py): a v1-architecture pipeline built
   from configs with random weights -- the compute is the real model's (UNet about 860M
   parameters, CLIP ViT-L/14 text encoder, the SD VAE), nothing is downloaded. It is saved once in
   diffusers' folder layout (.cache/bench_generate) and then goes through dafusion.py's own path:
   sd_generator loads it like a downloaded model (fp16 on CUDA, PyTorch's fused attention),
   loads the class token (random vectors stand in for textual inversion) and returns
   make_images, which both settings call with jobs from plan_jobs. 512 px, strength 0.5, 50 DDIM
   steps, guidance 15, in one process:
     (a) one image per call, as DA-Fusion's own code generates;
     (b) --batch-size images per call (one prompt and one seeded generator per image);
     (c) with --compile: as (b), dafusion.py --compile (torch.compile of the UNet).
   The printed ratio is (b) / (a).
2. The offline ddpm generator (dafusion.py's default): train it on digits once (cached in
   .cache/bench_generate), then SDEdit images per second at the ID and near-OOD strengths.

Run:   python benchmarks/bench_generate.py --device cuda                 # both, full size
       python benchmarks/bench_generate.py --device cpu --size tiny --images 4   # a smoke run
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import dafusion  # noqa: E402
import data  # noqa: E402
from tiny_sd import build_pipeline_folder  # noqa: E402  (offline tokenizer + configs)

# (text encoder, UNet, VAE) sizes: "full" is Stable Diffusion v1.x, "tiny" a CPU smoke test
SIZES = {
    "full": dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                           cross_attention_dim=768, sample_size=64),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512), pixels=512),
    "tiny": dict(text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
                 unet=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=8,
                           cross_attention_dim=32, sample_size=8, norm_num_groups=32),
                 vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64,
                          norm_num_groups=32), pixels=64),
}


def build_model_folder(size, folder, dtype):
    """Save a StableDiffusionImg2ImgPipeline with SD v1's architecture and random weights in
    diffusers' folder layout, so that dafusion.py loads it the way it loads a downloaded model."""
    spec = SIZES[size]
    parameters = build_pipeline_folder(folder, spec["text"], spec["unet"], spec["vae"], dtype, vae_blocks=4)
    print(f"UNet {parameters / 1e6:.0f}M parameters, {spec['pixels']} px")


def sd_images_per_second(args, device):
    """(a) and (b) through dafusion.sd_generator: the model loaded from its folder, the class token
    loaded from OUT/embeddings (random vectors stand in for textual inversion), jobs from plan_jobs."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    root = os.path.join(".cache", "bench_generate")
    folder = os.path.join(root, f"sd-{args.size}-{str(dtype).split('.')[-1]}")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        build_model_folder(args.size, folder, dtype)
    out = os.path.join(root, "out")
    n = max(args.images, args.batch_size)
    g = torch.Generator().manual_seed(0)
    # one class of 32 px images (noise): pipeline_images upsamples them to the model's resolution
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    part = data.ImageSet(images, torch.zeros(n, dtype=torch.long), ["part"],
                         names=[f"noise/{i}" for i in range(n)])
    splits = data.Splits(part, part, None, ["part"], [])
    gen_args = dafusion.with_generation_defaults(dafusion.build_parser().parse_args(
        ["--out", out, "--generator", "stable-diffusion", "--model", folder, "--guidance",
         str(args.guidance), "--steps", str(args.steps), "--ood-strength", str(args.strength),
         "--num-vectors", "4"]))
    with open(os.path.join(folder, "text_encoder", "config.json")) as f:
        hidden = json.load(f)["hidden_size"]
    dafusion.save_embedding(os.path.join(out, "embeddings", "part.safetensors"), "<part>",
                            0.01 * torch.randn(4, hidden, generator=g))
    make_images = dafusion.sd_generator(gen_args, splits, device)
    compiled = None
    if args.compile:  # a second generator, as `dafusion.py --compile` builds it
        gen_args.compile = True
        compiled = dafusion.sd_generator(gen_args, splits, device)
    jobs = dafusion.plan_jobs(part, part.names, 1, args.strength, [args.strength], 0,
                              kinds=("near_ood",))
    pixels = SIZES[args.size]["pixels"]
    print(f"img2img through dafusion.py, {pixels} px, strength {args.strength}, {args.steps} steps, "
          f"guidance {args.guidance}, {dtype}")

    def rate(batch, total, make_images=make_images):
        make_images(jobs[:batch])  # warm-up (cudnn's algorithm search; compiling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, total, batch):
            images = make_images(jobs[start:min(start + batch, total)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert images[0].size == (pixels, pixels)
        return total / (time.perf_counter() - t0)

    rates = {"(a) one image per call": rate(1, max(2, args.images // 8)),
             f"(b) {args.batch_size} images per call": rate(args.batch_size, args.images)}
    if compiled is not None:
        del make_images
        rates[f"(c) {args.batch_size} images per call, --compile"] = rate(args.batch_size, args.images, compiled)
    return rates


def ddpm_images_per_second(args, device):
    """The offline generator: train once on digits (cached), then time SDEdit at both strengths."""
    splits = data.load_data("digits")
    s = splits.train
    unet = dafusion.train_ddpm(s.images, s.labels, len(s.classes), os.path.join(".cache", "bench_generate", "ddpm"),
                               device=device)
    index = torch.arange(min(len(s), args.ddpm_images))
    rates = {}
    for strength in (0.2, 0.5):
        dafusion.sdedit(unet, s.images[index[:8]], s.labels[index[:8]], strength, 2.0, list(range(8)), len(s.classes))
        t0 = time.perf_counter()
        for start in range(0, len(index), 256):
            batch = index[start:start + 256]
            dafusion.sdedit(unet, s.images[batch], s.labels[batch], strength, 2.0, batch.tolist(), len(s.classes))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[strength] = len(index) / (time.perf_counter() - t0)
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--images", type=int, default=64, help="images timed per setting")
    p.add_argument("--batch-size", type=int, default=32, help="images per pipeline call in (b)")
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=15.0)
    p.add_argument("--ddpm-images", type=int, default=1024, help="images timed for the ddpm generator")
    p.add_argument("--compile", action="store_true", help="also (c): dafusion.py --compile (torch.compile of the UNet)")
    p.add_argument("--skip", choices=["sd", "ddpm"], default=None, help="leave one of the two parts out")
    args = p.parse_args()
    device = data.pick_device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{machine}, torch {torch.__version__}")
    if args.skip != "sd":
        rates = sd_images_per_second(args, device)
        one = rates["(a) one image per call"]
        for name, value in rates.items():
            print(f"{name:50s} {value:7.2f} images/s   ratio to (a) {value / one:5.2f}x")
    if args.skip != "ddpm":
        rates = ddpm_images_per_second(args, device)
        print("ddpm generator (digits, 16 px, 20 DDIM steps, guidance 2): " +
              ", ".join(f"strength {k}: {v:.0f} images/s" for k, v in rates.items()))


if __name__ == "__main__":
    main()
