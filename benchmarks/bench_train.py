"""
benchmarks/bench_train.py -- SupCon training throughput (images per second, 2 views each) of two
pipelines in one process, on the same data, model and batch:

  (a) reference-style: PIL transforms (SimCLR's random resized crop, flip, colour jitter, grayscale)
      in DataLoader worker processes, two views per image, fp32, the reference-style loss of
      bench_loss.py. This is how the widely copied SupCon code trains.
  (b) this project's path: train.py's own functions (make_views, train_step) on the training
      set decoded once into a uint8 tensor on the device: the same augmentations batched on the
      device with per-sample parameters, bf16 autocast and channels_last on CUDA, the chunked
      supcon_loss with its row bookkeeping on the CPU, host -> device copies from pinned memory
      (no step waits for the GPU); then
      (b) again with the images in host memory, gathered by DataLoader workers (train.py
      --data-on host); --compile adds (c): (b) with torch.compile, as train.py --compile.

Both train a ResNet-18 with the small-image stem (3x3 conv, no max-pool) and the SupCon projection
head with SGD; only the timed steps after --warmup steps count. The printed ratio is (b) / (a).

Run:   python benchmarks/bench_train.py --device cuda --data .data/cifar10 --batch-size 512
       python benchmarks/bench_train.py --device cpu --batch-size 32 --steps 3   # a smoke run
(.data/cifar10: the CIFAR-10 JPEG folder of ../shared/data extracted; `--data cifar10` reads
torchvision's files under --data-root instead; `--data digits` works anywhere.)
"""

import argparse
import os
import platform
import sys
import time

import torch
from torchvision import transforms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import supcon  # noqa: E402
import train  # noqa: E402
from bench_loss import baseline_supcon  # noqa: E402


class TwoViews(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) -> two PIL-transformed views per image, as the reference code does."""

    def __init__(self, images, labels, mean, std):
        self.images, self.labels = images, labels
        size = images.shape[-1]
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.ToTensor(),
            transforms.Normalize(mean.tolist(), std.tolist()),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = transforms.functional.to_pil_image(self.images[i])
        return torch.stack([self.transform(image), self.transform(image)]), self.labels[i]


def build(args, in_channels, image_size, num_classes, device):
    torch.manual_seed(0)
    model, _ = supcon.build_model("resnet18", "supcon", in_channels, image_size, num_classes)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, opt


def reference_step(model, opt, views, labels, loss_fn):
    """One step of the reference-style pipeline: fp32, the reference-style loss."""
    B = views.shape[0]
    z = model(views.flatten(0, 1)).view(B, 2, -1)  # (B, 2, D)
    loss = loss_fn(z, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(run_steps, warmup, steps, device):
    """Seconds for `steps` steps after `warmup` untimed ones."""
    run_steps(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_steps(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def reference_pipeline(args, splits, mean, std, device):
    """(a): DataLoader workers with PIL transforms, fp32, the reference-style loss."""
    s = splits.train
    model, opt = build(args, s.images.shape[1], s.images.shape[2], len(splits.classes), device)
    loader = torch.utils.data.DataLoader(
        TwoViews(s.images, s.labels, mean, std), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0)
    no_negatives = torch.zeros(args.batch_size, dtype=torch.bool, device=device)
    batches = iter(())

    def run_steps(n):
        nonlocal batches
        for _ in range(n):
            try:
                views, labels = next(batches)
            except StopIteration:  # a new epoch
                batches = iter(loader)
                views, labels = next(batches)
            views, labels = views.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            reference_step(model, opt, views, labels, lambda z, y: baseline_supcon(z, y, no_negatives))
    return timed(run_steps, args.warmup, args.steps, device)


def project_pipeline(args, splits, mean, std, device, compile=False, data_on="device"):
    """(b): train.py's own step (train.make_views, train.train_step) on uint8 images held on
    the device: batched augmentations, bf16 autocast and channels_last on CUDA, CPU labels.
    data_on="host": the images stay in host memory and DataLoader workers gather each batch into
    pinned memory (train.py --data-on host, for sets larger than the GPU's memory)."""
    s = splits.train
    model, opt = build(args, s.images.shape[1], s.images.shape[2], len(splits.classes), device)
    cuda = device.type == "cuda"
    if cuda:  # as train.py: NHWC weights, cuDNN's fastest algorithms
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    forward = torch.compile(model) if compile else model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # constant, as (a)
    settings = train.with_defaults(train.build_parser().parse_args(
        ["--loss", "supcon", "--temperature", "0.1", "--chunk-size", "1024"]))
    gens = train.Generators(0, device)
    loss_of = train.make_loss(settings, gens.mining)  # as train.py: chosen once
    images = s.images.to(device) if data_on == "device" else s.images  # decoded once
    mean, std = mean.to(device), std.to(device)
    no_negatives = torch.zeros(args.batch_size, dtype=torch.bool)
    fetched = iter(())  # host path: the uint8 images of the coming batches, from the workers
    order = torch.empty(0, dtype=torch.long)

    def run_steps(n):
        nonlocal order, fetched
        for _ in range(n):
            if len(order) < args.batch_size:  # a new epoch (its order drawn on the CPU)
                order = torch.randperm(len(images))
                whole = len(order) // args.batch_size * args.batch_size
                batches = list(order[:whole].split(args.batch_size))
                if data_on == "host":
                    fetched = data.host_batches(images, batches, workers=args.workers,
                                                pin_memory=cuda)
            batch, order = order[:args.batch_size], order[args.batch_size:]  # (B,) CPU
            local = data.to_device(next(fetched), device) if data_on == "host" else \
                images[data.to_device(batch, device)]  # (B, C, H, W) uint8, as train.py
            views = train.make_views(local, len(local), "simclr", 2, gens, mean, std)
            # CPU labels: supcon_loss's row bookkeeping runs on the CPU, the GPU never waits
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=views.is_cuda):
                loss = loss_of(train.forward(settings, forward, None, views), s.labels[batch],
                               no_negatives, no_negatives, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            train.train_step(opt, sched, loss_of)  # as train.run's loop
    return timed(run_steps, args.warmup, args.steps, device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="digits, cifar10 (torchvision files) or an image folder")
    p.add_argument("--data-root", default="./.data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512, help="images per step (x2 views)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per pipeline")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn, workers, compile)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="DataLoader workers of (a)")
    p.add_argument("--compile", action="store_true", help="also (c): (b) with torch.compile (train.py --compile)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    args = p.parse_args()
    device = data.pick_device(args.device)
    splits = data.load_data(args.data, args.data_root, image_size=args.image_size, ood_classes="")
    mean, std = data.channel_stats(splits.train.images)
    if len(splits.train) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(splits.train)} training images")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{machine}, torch {torch.__version__}; {args.data}: {len(splits.train)} images "
          f"{tuple(splits.train.images.shape[1:])}, ResNet-18, batch {args.batch_size} x 2 views, "
          f"{args.steps} timed steps after {args.warmup}")
    images = args.batch_size * args.steps
    seconds_a = reference_pipeline(args, splits, mean, std, device)
    print(f"(a) reference-style (PIL in {args.workers} workers, fp32): {images / seconds_a:9.0f} images/s")
    seconds_b = project_pipeline(args, splits, mean, std, device)
    label = "bf16, channels_last" if device.type == "cuda" else "fp32"
    print(f"(b) this project (uint8 on device, batched augment, {label}): {images / seconds_b:9.0f} images/s")
    print(f"ratio (b)/(a): {seconds_a / seconds_b:.2f}x")
    seconds_host = project_pipeline(args, splits, mean, std, device, data_on="host")
    print(f"(b) with the images in host memory (train.py --data-on host, {args.workers} workers): "
          f"{images / seconds_host:9.0f} images/s; ratio to (a): {seconds_a / seconds_host:.2f}x")
    if args.compile:  # train.py --compile
        seconds_c = project_pipeline(args, splits, mean, std, device, compile=True)
        print(f"(c) as (b), torch.compile: {images / seconds_c:9.0f} images/s; ratio (c)/(a): {seconds_a / seconds_c:.2f}x")


if __name__ == "__main__":
    main()
