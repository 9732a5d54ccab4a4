"""
benchmarks/bench_generate.py -- DA-Fusion generation throughput (images per second).

1. Stable Diffusion img2img (the DA-Fusion step of dafusion.py): a v1-architecture pipeline built
   from configs with random weights -- the compute is the real model's (UNet about 860M
   parameters, CLIP ViT-L/14 text encoder, the SD VAE), nothing is downloaded. 512 px,
   strength 0.5, 50 DDIM steps, guidance 15, in one process:
     (a) one image per call, as DA-Fusion's own code generates;
     (b) dafusion.py's path: --batch-size images per call (one prompt per image, one seeded
         generator per image), fp16 on CUDA, PyTorch's fused attention; --compile adds
         torch.compile of the UNet.
   The printed ratio is (b) / (a).
2. The offline ddpm generator (dafusion.py's default): train it on digits once (cached in
   .cache/bench_generate), then SDEdit images per second at the ID and near-OOD strengths.

Run:   python benchmarks/bench_generate.py --device cuda                 # both, full size
       python benchmarks/bench_generate.py --device cpu --size tiny --images 4   # a smoke run
"""

import argparse
import os
import platform
import sys
import time

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import dafusion  # noqa: E402
import data  # noqa: E402
from tiny_sd import write_tokenizer  # noqa: E402  (the offline CLIP tokenizer recipe)

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


def build_pipeline(size, device, dtype, folder):
    """StableDiffusionImg2ImgPipeline with SD v1's architecture and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    spec = SIZES[size]
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, max_position_embeddings=77, bos_token_id=512,
                                                eos_token_id=513, pad_token_id=513, **spec["text"]))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **spec["vae"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, {spec['pixels']} px")
    return pipe.to(device, dtype), spec["pixels"]


def images_per_second(pipe, pixels, batch, total, args, device):
    """Generate `total` images in calls of `batch`, the way dafusion.sd_generator calls the pipeline."""
    source = Image.new("RGB", (pixels, pixels), (120, 90, 60))

    def call(n, seed0):
        pipe(prompt=["a photo of a <part>"] * n, image=[source] * n, strength=args.strength,
             guidance_scale=args.guidance, num_inference_steps=args.steps, output_type="pil",
             generator=[torch.Generator(device="cpu").manual_seed(seed0 + i) for i in range(n)])

    call(batch, 0)  # warm-up (cudnn, compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        call(min(batch, total - start), start)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return total / (time.perf_counter() - t0)


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--images", type=int, default=64, help="images timed per setting")
    p.add_argument("--batch-size", type=int, default=32, help="images per pipeline call in (b)")
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=15.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet in (b)")
    p.add_argument("--ddpm-images", type=int, default=1024, help="images timed for the ddpm generator")
    p.add_argument("--skip", choices=["sd", "ddpm"], default=None, help="leave one of the two parts out")
    args = p.parse_args()
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{machine}, torch {torch.__version__}")
    if args.skip != "sd":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe, pixels = build_pipeline(args.size, device, dtype, os.path.join(".cache", "bench_generate", "tokenizer"))
        print(f"img2img, strength {args.strength}, {args.steps} steps, guidance {args.guidance}, {dtype}")
        one = images_per_second(pipe, pixels, 1, max(2, args.images // 8), args, device)
        print(f"(a) one image per call:        {one:7.2f} images/s")
        if args.compile:
            pipe.unet = torch.compile(pipe.unet)
        batched = images_per_second(pipe, pixels, args.batch_size, args.images, args, device)
        print(f"(b) {args.batch_size} images per call{' (compiled)' if args.compile else ''}: {batched:7.2f} images/s")
        print(f"ratio (b)/(a): {batched / one:.2f}x")
    if args.skip != "ddpm":
        rates = ddpm_images_per_second(args, device)
        print("ddpm generator (digits, 16 px, 20 DDIM steps, guidance 2): " +
              ", ".join(f"strength {k}: {v:.0f} images/s" for k, v in rates.items()))


if __name__ == "__main__":
    main()
