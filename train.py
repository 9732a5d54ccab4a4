"""
train.py -- train an encoder with SupCon (near-OOD synthetic images as hard negatives only),
SimCLR, triplet, cosine-pair or cross-entropy loss, then a linear classifier on the frozen encoder,
and report test accuracy and OOD detection on held-out classes.

The thesis's pipeline (section "Experiments"): contrastive pre-training of the encoder with the
re-engineered SupCon loss (supcon.py, Eq. 1) on real images (+ ID augmentations as extra positives,
+ near-OOD augmentations as negatives only), then a linear classifier on the frozen encoder
trained on real (+ ID) images. `--loss ce` trains encoder + classifier end to end (the baseline).

Run:   python train.py                                  # SupCon on sklearn's digits, CPU, ~1 min
       python train.py --loss triplet --mining semi_hard
       python train.py --data PATH --model resnet18 --image-size 64
       python train.py --synthetic DIR --positives id --negatives near_ood
       python train.py --resume runs/<name>             # continue an interrupted run exactly
       torchrun --nproc_per_node=4 train.py --model resnet18 ...   # DistributedDataParallel
Results go to runs/<name>/: config.json, metrics.jsonl (per epoch), metrics.json, checkpoint.pt.

Several GPUs (torchrun): every process holds the data, cuts the same global batch into one shard
per process, and gathers the embeddings of all shards *with* their gradients before the loss, so
every anchor contrasts the whole global batch and the gradients equal one process on that batch.
Rank 0 alone writes files and prints.
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import dafusion
import data
import evaluate
import supcon

LOSSES = ("supcon", "simclr", "triplet", "cosine", "ce")


def build_parser():
    """train.py's command line: data, synthetic data, model, loss, optimisation, run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_arguments(p)
    s = p.add_argument_group("synthetic data (DA-Fusion, see dafusion.py)")
    s.add_argument("--synthetic", default=None,
                   help="folder with manifest.csv written by dafusion.py; without it, --positives / "
                        "--negatives generate with the ddpm generator into a cache (.cache/dafusion)")
    s.add_argument("--positives", choices=["none", "id", "id+near_ood"], default="none",
                   help="id: add the in-distribution synthetic images as labelled training samples; "
                        "id+near_ood: the near-OOD ones too, as plain positives (an ablation)")
    s.add_argument("--no-real", action="store_true",
                   help="train on the synthetic positives alone (the seed fruit project's 'synthetic only')")
    s.add_argument("--negatives", choices=["none", "near_ood"], default="none",
                   help="near_ood: add the near-OOD synthetic images as negative-only samples")
    s.add_argument("--negatives-per-batch", type=float, default=0.25,
                   help="share of each batch that is negative-only (when there are negatives)")
    s.add_argument("--m-per-class", type=int, default=4,
                   help="labelled images come in groups of m per class, so anchors have positives")
    s.add_argument("--synthetic-margin", action="store_true",
                   help="cut 20-30%% off top and bottom of square synthetic images (use with --resize letterbox)")
    dafusion.add_generation_arguments(p)  # used when --positives/--negatives come without --synthetic
    m = p.add_argument_group("model")
    m.add_argument("--model", default="cnn", choices=["cnn", *supcon.RESNETS],
                   help="cnn: the seed project's small CNN; ResNets get a 3x3 stem for images <= 64 px")
    m.add_argument("--pretrained", action="store_true", help="ImageNet weights (ResNets; must be cached)")
    m.add_argument("--embedding-dim", type=int, default=128, help="output size of the projection head")
    l = p.add_argument_group("loss")
    l.add_argument("--loss", choices=LOSSES, default="supcon",
                   help="supcon (Eq. 1), simclr (labels ignored), triplet, cosine (pairs), ce (end-to-end baseline)")
    l.add_argument("--temperature", type=float, default=0.1, help="SupCon / SimCLR tau")
    l.add_argument("--base-temperature", type=float, default=None,
                   help="multiply the SupCon loss by tau/base (the reference code's 0.07); default off")
    l.add_argument("--hard-negatives", choices=["same_class", "all"], default="same_class",
                   help="which anchors a near-OOD negative contrasts: its source class's, or every one")
    l.add_argument("--negative-weight", type=float, default=1.0, help="weight of near-OOD exp-terms")
    l.add_argument("--chunk-size", type=int, default=1024,
                   help="SupCon anchors per block of the exact chunked path (memory about 4 x this x N "
                        "bytes; larger blocks run faster on a GPU); 0 = the plain path")
    l.add_argument("--margin", type=float, default=None, help="triplet (default 0.5) / cosine (default 0.0)")
    l.add_argument("--mining", choices=supcon.MINING, default="random", help="triplet mining")
    l.add_argument("--distance", choices=["euclidean", "cosine"], default="euclidean", help="triplet distance")
    l.add_argument("--mining-scope", choices=["batch", "dataset"], default="batch",
                   help="triplets mined in each batch, or over the whole training set once per epoch")
    l.add_argument("--augment", choices=["auto", "none", "rotation", "simclr"], default="auto",
                   help="views for training (auto: rotation for greyscale data, simclr for colour)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=30, help="passes over the labelled training images")
    o.add_argument("--batch-size", type=int, default=256, help="images per batch (x2 views)")
    o.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="SGD has momentum 0.9")
    o.add_argument("--lr", type=float, default=None, help="default: 1e-3 AdamW, 0.05 SGD")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the optimiser")
    o.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine decay")
    o.add_argument("--linear-epochs", type=int, default=100, help="linear classifier on frozen features")
    o.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N epochs, a linear probe's test accuracy in metrics.jsonl (accuracy vs minutes)")
    o.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or e.g. cpu, cuda:1")
    o.add_argument("--data-on", choices=["auto", "device", "host"], default="auto",
                   help="where the decoded uint8 training set lives. device: copied once to the "
                        "device (fastest); host: stays in host memory, DataLoader workers gather "
                        "each batch into pinned memory, copied while the previous step runs (sets "
                        "larger than the GPU's memory). auto: device when the set takes less than "
                        "half of the GPU's free memory. Views are made on the device either way")
    o.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes of --data-on host (default: 4, at most one per core)")
    o.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first steps)")
    o.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: batch-norm statistics over the global batch (SyncBatchNorm)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs", help="parent folder of run folders")
    r.add_argument("--name", default=None, help="run folder name (default: loss-data-time)")
    r.add_argument("--resume", default=None, metavar="RUN", help="continue the run in folder RUN")
    r.add_argument("--no-report", action="store_true", help="metrics only: no pictures, no report.md")
    r.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from the weights of a finished run (pre-train on synthetic, fine-tune on real)")
    return p


# -----------------------------------------------------------------------------
# Small helpers


def pick_device(name):
    """--device auto: CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":  # what the user asked for, e.g. cuda:1
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def atomic_save(obj, path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows: the old file or the new, never half


def lr_factor(step, total_steps, warmup_steps):
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:  # large-batch SGD is unstable in its first steps (Goyal et al. 2017)
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1 after warm-up
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # 1 -> 0


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""
    pass


# -----------------------------------------------------------------------------
# Model and loss


def gather_rows(z, sizes):
    """Concatenate every rank's rows of z, keeping the autograd graph (torchrun only).

    z: (sizes[rank], ...) this rank's rows; returns (sum(sizes), ...) in rank order. A plain
    torch.distributed.all_gather returns tensors without gradients; torch.distributed.nn's version
    sends each rank's share of the gradient back in backward (a reduce-scatter: the SUM over ranks).
    Shards may differ in size by one, so they are padded to the largest and cut back after."""
    pad = max(sizes) - z.shape[0]  # all_gather needs equal shapes on every rank
    z = F.pad(z, (0, 0) * (z.dim() - 1) + (0, pad))  # (max(sizes), ...)
    parts = dist_nn.all_gather(z)  # world x (max(sizes), ...), differentiable
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def compute_loss(args, model, classifier, views, labels, negative_only, generator, sizes=None):
    """One batch's loss. views: (b, V, C, H, W) augmented images of this process's rows of the
    batch; labels, negative_only: (B,) for the whole batch, best on the CPU (SupCon then does its
    row bookkeeping there, and the GPU never waits for it). sizes: the rows of each process
    under torchrun (None in one process: b = B).

    Under torchrun every rank returns a loss whose gradient, after DDP's *average* over ranks,
    equals one process's gradient on the whole batch:
    - contrastive losses gather all embeddings (gather_rows), so every rank computes the same
      loss L on all B rows; backward sums the W ranks' gradients into each rank's rows (W dL/dz),
      and DDP's average divides the W back out: no scaling;
    - cross-entropy is a mean over rows, computed on this rank's b rows and scaled by b W / B, so
      the average over ranks is the mean over the whole batch."""
    b, V = views.shape[:2]  # b rows of this process, V views each
    rank, world = data.distributed() if sizes else (0, 1)  # one process: rank 0 of 1
    start = sum(sizes[:rank]) if sizes else 0  # where this rank's rows begin in the batch
    x = views.flatten(0, 1)  # (b*V, C, H, W), image-major
    if args.loss == "ce":  # the head is nn.Identity for ce: model(x) is the encoder's features
        local = supcon.to_device(labels[start:start + b].repeat_interleave(V), x.device)  # (b*V,)
        return F.cross_entropy(classifier(model(x)), local) * (b * world / len(labels))
    z = model(x).float().view(b, V, -1)  # (b, V, D)
    if sizes:  # torchrun: the loss needs every rank's embeddings
        z = gather_rows(z, sizes)  # (B, V, D): the whole batch, with gradients
    if args.loss == "supcon":  # Eq. 1 with labels: positives share the class
        return supcon.supcon_loss(z, labels, negative_only, temperature=args.temperature,
                                  base_temperature=args.base_temperature,
                                  hard_negatives=args.hard_negatives,
                                  negative_weight=args.negative_weight,
                                  chunk_size=args.chunk_size or None)
    if args.loss == "simclr":  # labels=None: positives are the other views of the same image
        return supcon.supcon_loss(z, None, negative_only, temperature=args.temperature,
                                  base_temperature=args.base_temperature, hard_negatives="all",
                                  negative_weight=args.negative_weight,
                                  chunk_size=args.chunk_size or None)
    # triplet / cosine: every view is a sample of its image's class
    z, labels, negative_only = z.flatten(0, 1), labels.repeat_interleave(V), negative_only.repeat_interleave(V)
    if args.loss == "triplet":  # (B*V, D) rows, each view its own sample
        return supcon.triplet_loss(z, labels, negative_only, margin=args.margin, mining=args.mining,
                                   distance=args.distance, generator=generator)
    return supcon.cosine_pair_loss(z, labels, negative_only, margin=args.margin)


def data_placement(args, images, device):
    """--data-on auto: the training set goes to the GPU when it takes less than half of the free
    memory (the rest is for the model and the activations), else it stays in host memory."""
    if args.data_on != "auto":  # the user's choice
        return args.data_on
    if device.type != "cuda":  # CPU (and Apple's unified memory): host and device are one memory
        return "device"
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return "device" if images.nbytes < free_bytes / 2 else "host"


def check_args(args):
    """Refuse combinations that cannot work, saying how to fix them."""
    if args.margin is None:  # the seed projects' margins
        args.margin = 0.5 if args.loss == "triplet" else 0.0
    if args.lr is None:  # the usual learning rates of each optimiser
        args.lr = 1e-3 if args.optimizer == "adamw" else 0.05
    uses_synthetic = args.positives != "none" or args.negatives != "none"  # any DA-Fusion images at all
    if args.negatives != "none" and args.loss == "ce":
        raise SystemExit("--negatives near_ood needs a contrastive loss (--loss supcon, simclr, triplet "
                         "or cosine): cross-entropy has no way to use negative-only images.")
    if args.loss == "simclr" and args.negatives != "none" and args.hard_negatives == "same_class":
        args.hard_negatives = "all"  # SimCLR has no classes to mask by
    if args.synthetic and not uses_synthetic:
        raise SystemExit("--synthetic DIR given but not used: add --positives id and/or --negatives near_ood")
    if args.positives == "id+near_ood" and args.negatives != "none":
        raise SystemExit("--positives id+near_ood uses the near-OOD images as positives; drop --negatives")
    if args.no_real and args.positives == "none":
        raise SystemExit("--no-real leaves nothing to train on: add --positives id")
    if args.init_from and not os.path.exists(os.path.join(args.init_from, "model.pt")):
        raise SystemExit(f"--init-from {args.init_from}: no model.pt there; pass a finished run folder")
    if args.mining_scope == "dataset" and args.loss != "triplet":
        raise SystemExit("--mining-scope dataset is for --loss triplet")
    if not 0 <= args.negatives_per_batch < 1:
        raise SystemExit("--negatives-per-batch must be in [0, 1)")
    if args.workers < 0:
        raise SystemExit("--workers must be >= 0 (0: gather the batches in the main process)")


# -----------------------------------------------------------------------------
# Training


def load_training_data(args):
    """Real splits plus the synthetic images the flags ask for; returns (splits, train set)."""
    splits = data.splits_from_args(args)  # train / test / held-out OOD test
    train_set = splits.train  # the real images; synthetic ones are appended below
    if (args.positives != "none" or args.negatives != "none") and not args.synthetic:
        args.synthetic = dafusion.cached_synthetic_set(args, splits)  # generate once, then reuse
    if args.synthetic:
        _, C, H, _ = splits.train.images.shape  # synthetic images are read at the real images' size
        synthetic = data.read_manifest(args.synthetic, splits.classes, H, C, args.resize,
                                       args.synthetic_margin, args.seed)
        keep = torch.zeros(len(synthetic), dtype=torch.bool)  # (S,) which synthetic images this run uses
        if args.positives in ("id", "id+near_ood"):
            keep |= synthetic.kind == data.KIND_ID
        if args.negatives == "near_ood" or args.positives == "id+near_ood":
            keep |= synthetic.kind == data.KIND_NEAR_OOD
        synthetic = synthetic.subset(torch.nonzero(keep).squeeze(1))  # only the kinds asked for
        if args.positives == "id+near_ood":  # the ablation: near-OOD images as labelled positives
            synthetic.negative_only = torch.zeros_like(synthetic.negative_only)
        train_set = data.ImageSet.concat([None if args.no_real else train_set, synthetic])
    return splits, train_set


def epoch_batches(args, train_set, epoch, model, mean, std, device):
    """The index batches of one epoch (deterministic in seed and epoch). Dataset-scope triplet
    mining returns (T, 3) triplet index batches instead, mined on the current embeddings."""
    if args.mining_scope == "dataset":  # embed the whole set, mine triplets over it
        with torch.no_grad():
            model.eval()  # mining sees the embeddings without dropout or batch statistics
            # (N, D) embeddings of the whole training set, no augmentation, 512 images at a time
            z = torch.cat([model(data.to_float(train_set.images[s:s + 512].to(device), mean, std)).float().cpu()
                           for s in range(0, len(train_set), 512)])
            model.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # one stream per (seed, epoch)
        # (T,) each: one triplet per anchor
        a, p, n = supcon.mine_triplets(z, train_set.labels, train_set.negative_only,
                                       margin=args.margin, mining=args.mining,
                                       distance=args.distance, generator=g)
        triplets = torch.stack([a, p, n], 1)[torch.randperm(len(a), generator=g)]  # (T, 3) shuffled
        return list(torch.split(triplets, max(1, args.batch_size // 3)))  # about batch_size images per step
    if args.loss == "ce":  # plain shuffled batches for cross-entropy
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        # plain shuffled batches
        return list(torch.split(torch.randperm(len(train_set), generator=g), args.batch_size))
    return data.contrastive_batches(train_set.labels, train_set.negative_only, args.batch_size,
                                    args.m_per_class, args.negatives_per_batch, args.seed, epoch)


def train_linear(args, features, labels, num_classes, device, seed):
    """Linear classifier on frozen encoder features (N, F): AdamW, cosine schedule, seeded."""
    g = torch.Generator().manual_seed(seed)  # the batch order of the linear probe
    torch.manual_seed(seed)  # its initial weights
    classifier = nn.Linear(features.shape[1], num_classes).to(device)  # W: (K, F), b: (K,)
    # standardise the features (the statistics are folded into the layer at the end)
    mu, sigma = features.mean(0), features.std(0).clamp(min=1e-6)  # (F,) each; clamp: a dead feature
    x, y = ((features - mu) / sigma).to(device), labels.to(device)  # (N, F), (N,)
    opt = torch.optim.AdamW(classifier.parameters(), lr=1e-2, weight_decay=1e-4)  # convex: one setting serves all runs
    steps = args.linear_epochs * math.ceil(len(x) / 256)  # batches of 256
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 0))  # cosine decay, no warm-up
    for _ in range(args.linear_epochs):  # full passes over the (N, F) features
        # the order is drawn on the CPU (the same on every device) and moved over once per epoch
        for idx in torch.split(torch.randperm(len(x), generator=g).to(device), 256):
            # the probe never changes the encoder
            loss = F.cross_entropy(classifier(x[idx]), y[idx])  # mean over the batch of 256
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():  # fold the standardisation in: W (x - mu)/sigma + b
        w = classifier.weight / sigma.to(device)  # (K, F) W / sigma
        classifier.bias -= (w * mu.to(device)).sum(1)  # b - (W / sigma) mu
        classifier.weight.copy_(w)
    return classifier


def probe_accuracy(args, model, classifier, labelled, test, mean, std, device, num_classes):
    """Test accuracy of a linear probe on the current encoder (ce: of its own head), for
    --eval-every. It runs on its own copy of the random state, so evaluating during training
    changes nothing that training draws afterwards (resume stays exact)."""
    # fork_rng: the global random state is restored when the probe is done
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        test_f = evaluate.extract_features(model, test.images, mean, std, device)  # (N_test, F)
        if args.loss != "ce":  # a fresh probe on the frozen features, as at the end of the run
            train_f = evaluate.extract_features(model, labelled.images, mean, std, device)
            classifier = train_linear(args, train_f, labelled.labels, num_classes, device, args.seed)
        with torch.no_grad():
            predicted = classifier(test_f.to(device)).argmax(1).cpu()  # (N_test,)
    return (predicted == test.labels).float().mean().item()


def main(argv=None):
    """Parse the arguments, set up the run folder (or reopen it for --resume) and train."""
    args = build_parser().parse_args(argv)
    # under torchrun: join the process group (rank 0 alone prints from here on)
    device = data.init_distributed(pick_device(args.device))
    rank, world = data.distributed()
    if args.resume:
        config_path = os.path.join(args.resume, "config.json")
        if not os.path.exists(config_path):
            raise SystemExit(f"--resume {args.resume}: no config.json there; is it a run folder?")
        with open(config_path) as f:  # the configuration the run started with
            saved = json.load(f)
        # the saved configuration; options added to train.py after the run started get their defaults
        defaults = vars(build_parser().parse_args([]))
        args = argparse.Namespace(**{**defaults, **saved, "resume": args.resume, "device": args.device})
        run_dir = args.resume  # write into the same folder
    else:
        check_args(args)  # refuse impossible flag combinations before any work
        name = [args.name or f"{args.loss}-{os.path.basename(str(args.data).rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if world > 1:  # the clocks of the ranks may differ by a second: rank 0's name for all
            torch.distributed.broadcast_object_list(name, src=0)
        run_dir = os.path.join(args.out, name[0])  # runs/<name>: config, checkpoints, metrics, plots
        if os.path.exists(os.path.join(run_dir, "config.json")):
            raise SystemExit(f"{run_dir} already holds a run; choose another --name, or continue "
                             f"it with --resume {run_dir}")
        data.barrier()  # every rank has checked before rank 0 writes
        if rank == 0:  # rank 0 alone writes files
            os.makedirs(run_dir, exist_ok=True)
    try:
        return run(args, run_dir, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def run(args, run_dir, device):
    """Train in run_dir as args say; returns the metrics (rank 0; {} on the other ranks)."""
    rank, world = data.distributed()
    torch.manual_seed(args.seed)  # model initialisation and dropout
    # ---- data: real training images (+ synthetic ID positives, + near-OOD negative-only images)
    splits, train_set = load_training_data(args)
    _, C, H, _ = train_set.images.shape  # channels and side of every image
    K = len(splits.classes)  # training classes (held-out OOD classes excluded)
    # the seed projects' choices
    augment = args.augment if args.augment != "auto" else ("rotation" if C == 1 else "simclr")
    print(f"data {args.data}: {len(splits.train)} real training images, {len(train_set) - len(splits.train)} "
          f"synthetic ({int(train_set.negative_only.sum())} negative-only), {len(splits.test)} test, "
          f"{K} classes; held out as OOD: {splits.ood_classes or 'none'}; device {device}")
    if not args.resume and rank == 0:
        data.atomic_write_text(json.dumps(vars(args), indent=2), os.path.join(run_dir, "config.json"))

    # normalisation statistics of the real training images (synthetic ones do not shift them)
    mean, std = data.channel_stats(splits.train.images)
    mean, std = mean.to(device), std.to(device)  # (C,), (C,)
    # ---- model: encoder + the loss's head; the linear classifier (trained here only for ce)
    model, classifier = supcon.build_model(args.model, args.loss, C, H, K, args.embedding_dim, args.pretrained)
    if args.init_from:  # e.g. pre-trained on synthetic images, now fine-tuned on real ones
        init = torch.load(os.path.join(args.init_from, "model.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(init["model"])
        classifier.load_state_dict(init["classifier"])
    model, classifier = model.to(device), classifier.to(device)
    if device.type == "cuda":  # NHWC: the layout tensor cores convolve fastest in
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all ranks' shards
    # contrastive: the probe trains later
    params = list(model.parameters()) + (list(classifier.parameters()) if args.loss == "ce" else [])
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    # the schedule needs the number of steps; dataset-scope mining only knows it after mining,
    # so it is estimated there from one triplet per training image
    steps_per_epoch = len(epoch_batches(args, train_set, 0, model, mean, std, device)) \
        if args.mining_scope != "dataset" else math.ceil(len(train_set) / max(1, args.batch_size // 3))
    total = args.epochs * steps_per_epoch  # optimiser steps of the whole run
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, int(args.warmup_epochs * steps_per_epoch)))
    # own generators for augmentation and mining, so a checkpoint can store and restore them
    aug_gen = torch.Generator(device=device).manual_seed(args.seed)
    mine_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    # ---- resume: model, optimiser, schedule, RNG, position (epoch and step within it)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    start_epoch, start_step = 0, 0
    if args.resume and os.path.exists(checkpoint_path):
        # tensors and plain containers only: never arbitrary pickles
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        classifier.load_state_dict(state["classifier"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        aug_gen.set_state(state["augment_rng"].cpu() if device.type == "cpu" else state["augment_rng"])
        mine_gen.set_state(state["mining_rng"].cpu() if device.type == "cpu" else state["mining_rng"])
        torch.set_rng_state(state["cpu_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        start_epoch, start_step = state["epoch"], state["step"]  # where the interrupted run stopped
        print(f"resumed {run_dir} at epoch {start_epoch + 1}, step {start_step}")

    # what the training step calls: DDP wrappers under torchrun (they average the gradients over
    # ranks), torch.compile on request; `model` and `classifier` stay the plain modules that are saved
    net, head = model, classifier
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
        if args.loss == "ce":
            head = DistributedDataParallel(classifier, device_ids=ids)
    if args.compile:
        net = torch.compile(net)

    def rng_states():
        """The random states a checkpoint stores, so --resume draws the same numbers."""
        states = {"augment_rng": aug_gen.get_state(), "mining_rng": mine_gen.get_state(),
                  "cpu_rng": torch.get_rng_state()}
        if device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state()
        return states

    def save_checkpoint(epoch, step, rng):
        """Everything --resume needs to continue at (epoch, step) as if never stopped."""
        if rank > 0:
            return
        atomic_save({"model": model.state_dict(), "classifier": classifier.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "step": step, **rng}, checkpoint_path)

    # Ctrl-C asks to stop at the next step boundary (a second Ctrl-C stops at once)
    stop = {"requested": False}

    def on_ctrl_c(signum, frame):
        """SIGINT handler: the first Ctrl-C asks to stop at the next step boundary."""
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nCtrl-C: saving and stopping after this step (press again to stop at once)")

    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)

    def stopping(requested):
        """Ctrl-C reaches every rank, not always at the same step: all stop when one asks."""
        if world == 1:
            return requested
        flag = torch.tensor(float(requested), device=device)
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def start_reading(value):
        """Queue a copy of a step's loss (a device scalar) to the host, for read_loss a step later.
        On CUDA the copy goes into pinned memory behind an event: read_loss then waits for that
        event only, which has long passed. (value.item() a step later would not do: its copy
        queues behind everything sent since, so it would wait for the GPU to run dry.)"""
        if device.type != "cuda":
            return value, None
        done = torch.cuda.Event()
        host = value.to("cpu", non_blocking=True)  # into pinned memory; valid once `done` has passed
        done.record()
        return host, done

    def read_loss(pending):
        """Read a step's loss (see start_reading), log it, stop on inf/nan."""
        if pending is None:
            return
        (value, done), at_epoch, at_step = pending
        if done is not None:
            done.synchronize()  # the copy has arrived
        value = value.item()
        if not math.isfinite(value):
            raise Diverged(f"loss is {value} at epoch {at_epoch + 1}, step {at_step}. Stopped; "
                           f"the last good checkpoint {checkpoint_path} is kept. Try a lower "
                           f"--lr or a higher --temperature.")
        losses.append(value)
        progress.update(1)
        progress.set_postfix(epoch=at_epoch + 1, loss=f"{value:.4f}")

    def mean_over_ranks(value):
        """The whole batch's loss from this rank's (the scaling of compute_loss makes it the mean)."""
        if world > 1:
            torch.distributed.all_reduce(value)
            value = value / world
        return value

    def to_layout(x):
        """channels_last on CUDA (faster convolutions), unchanged elsewhere."""
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    # ---- the training set, decoded once to uint8: on the device (default), or in host memory
    # for sets larger than the GPU's, fetched a batch at a time; views are made per batch
    data_on = data_placement(args, train_set.images, device)
    images = train_set.images.to(device) if data_on == "device" else train_set.images  # (N, C, H, W)
    if data_on == "host":
        print(f"training set in host memory ({train_set.images.nbytes / 2**20:.0f} MiB): "
              f"{args.workers} DataLoader workers gather the batches")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    views = 1 if args.loss == "ce" else 2  # two augmented views per image for contrastive losses
    metrics_log = os.path.join(run_dir, "metrics.jsonl")
    # the images the linear classifier trains on: real + ID, never the negative-only ones
    labelled = train_set.subset(torch.nonzero(~train_set.negative_only).squeeze(1))
    # training minutes: continued across --resume, without the time of --eval-every probes
    minutes_before, probe_seconds = 0.0, 0.0
    if start_epoch > 0 and os.path.exists(metrics_log):
        with open(metrics_log) as f:
            minutes_before = json.loads(f.read().splitlines()[-1])["minutes"]
    t_start = time.time()
    model.train()
    progress = tqdm(total=total, initial=start_epoch * steps_per_epoch + start_step, desc="train",
                    dynamic_ncols=True, disable=None if rank == 0 else True)
    epoch, step, updating, rng_at_step = start_epoch, start_step, False, rng_states()
    try:
        for epoch in range(start_epoch, args.epochs):
            # index batches of this epoch: m images per class + a share of negative-only ones
            batches = epoch_batches(args, train_set, epoch, model, mean, std, device)
            losses, pending = [], None  # pending: (start_reading(loss), epoch, step) not yet read
            first_step = start_step if epoch == start_epoch else 0  # a resumed epoch starts mid-way
            if data_on == "host":  # worker processes gather the uint8 images of the coming batches
                fetched = data.host_batches(images, batches, first_step, rank, world, args.workers,
                                            pin_memory=device.type == "cuda")
            for step in range(first_step, len(batches)):
                rng_at_step = rng_states()  # what a checkpoint taken before this step holds
                if stopping(stop["requested"]):
                    raise KeyboardInterrupt
                batch_cpu = batches[step]  # (B,) indices into the training set
                # the copy does not wait for the device (a blocking copy, or one from pageable
                # memory, would, and the device would then idle while this step is being queued)
                batch = supcon.to_device(batch_cpu, device)
                # under torchrun this rank embeds its shard of the batch, (b,) of (B,); in one
                # process the shard is the whole batch
                shards = batch.tensor_split(world)
                local, sizes = shards[rank], ([len(s) for s in shards] if world > 1 else None)
                # (b, C, H, W) uint8 images of this rank's rows ((3T, ...) for triplet batches)
                if data_on == "host":  # gathered by a worker; copied while the device is busy
                    local_images = supcon.to_device(next(fetched), device)  # already pinned by the workers
                else:
                    local_images = images[local.flatten()]
                if args.mining_scope == "dataset":  # (T, 3) triplets: embed a, p, n (one view each)
                    x = data.augment(local_images, augment, aug_gen, mean, std)
                    with autocast:
                        z = net(to_layout(x)).float().view(len(local), 3, -1)
                    # mean over this rank's triplets, scaled as in compute_loss
                    loss = supcon.triplet_margin(z[:, 0], z[:, 1], z[:, 2], margin=args.margin,
                                                 distance=args.distance) * (len(local) * world / len(batch))
                else:
                    x = torch.stack([to_layout(data.augment(local_images, augment, aug_gen, mean, std))
                                     for _ in range(views)], 1)  # (b, V, C, H, W)
                    with autocast:  # labels from the CPU copy: see compute_loss
                        loss = compute_loss(args, net, head, x, train_set.labels[batch_cpu],
                                            train_set.negative_only[batch_cpu], mine_gen, sizes)
                value = mean_over_ranks(loss.detach())  # the loss of the whole batch, on the device
                opt.zero_grad(set_to_none=True)
                loss.backward()
                updating = True  # parameters change now: no checkpoint of a half-done step
                opt.step()
                sched.step()
                updating = False
                # the previous step's loss is read now, not this one's: reading a value waits for
                # the GPU, and one step of lag lets it work through this step meanwhile
                read_loss(pending)
                pending = (start_reading(value), epoch, step)
            read_loss(pending)  # the epoch's last step, before its checkpoint is written
            pending = None
            step = 0  # the next epoch starts at its first step
            # one line per epoch in metrics.jsonl, and a checkpoint --resume can continue from
            record = {"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)), "lr": sched.get_last_lr()[0],
                      "minutes": minutes_before + (time.time() - t_start - probe_seconds) / 60}
            if args.eval_every and (epoch + 1) % args.eval_every == 0 and rank == 0:
                t_probe = time.time()
                record["probe_accuracy"] = probe_accuracy(args, model, classifier, labelled, splits.test,
                                                          mean, std, device, K)
                probe_seconds += time.time() - t_probe
                progress.write(f"epoch {epoch + 1}: linear probe test accuracy {record['probe_accuracy']:.4f} "
                               f"after {record['minutes']:.2f} min of training")
            if rank == 0:
                with open(metrics_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            save_checkpoint(epoch + 1, 0, rng_states())
    except KeyboardInterrupt:
        progress.close()
        if updating:  # stopped inside an optimiser step: the last checkpoint stays as it was
            print(f"\ninterrupted during an update: kept {checkpoint_path} as it was")
        elif rank == 0:  # everything up to the last finished step; --resume continues from there exactly
            save_checkpoint(epoch, step, rng_at_step)
            print(f"\ninterrupted: saved {checkpoint_path} at epoch {epoch + 1}, step {step}. "
                  f"Continue with: python train.py --resume {run_dir}")
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    progress.close()
    train_minutes = minutes_before + (time.time() - t_start - probe_seconds) / 60
    if rank > 0:  # rank 0 alone trains the linear classifier, evaluates and writes the results
        return {}

    # ---- linear classifier on the frozen encoder (real + ID images; never near-OOD ones)
    if args.loss != "ce":
        features = evaluate.extract_features(model, labelled.images, mean, std, device)
        classifier = train_linear(args, features, labelled.labels, K, device, args.seed)
    atomic_save({"model": model.state_dict(), "classifier": classifier.state_dict(),
                 "mean": mean.cpu(), "std": std.cpu(), "classes": splits.classes},
                os.path.join(run_dir, "model.pt"))
    # ---- the evaluation of evaluate.py: metrics.json, and report.md with the pictures
    synthetic = train_set.subset(torch.nonzero(train_set.kind != data.KIND_REAL).squeeze(1))
    results = {"train_minutes": train_minutes, "epochs": args.epochs,
               **evaluate.evaluate(model, classifier, splits, labelled, mean, std, device, run_dir,
                                   synthetic, pictures=not args.no_report, seed=args.seed)}
    data.atomic_write_text(json.dumps(results, indent=2), os.path.join(run_dir, "metrics.json"))
    line = f"test accuracy {results['test_accuracy']:.4f} (k-NN {results['knn_accuracy']:.4f})"
    if "ood_auroc_knn" in results:
        line += f"; OOD AUROC on held-out {','.join(splits.ood_classes)}: k-NN {results['ood_auroc_knn']:.4f}, MSP {results['ood_auroc_msp']:.4f}"
    print(f"{line}; training {train_minutes:.2f} min; results in {run_dir}"
          + ("" if args.no_report else f" (report: {os.path.join(run_dir, 'report.md')})"))
    return results


if __name__ == "__main__":
    try:
        main()
    except (Diverged, data.DataError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
