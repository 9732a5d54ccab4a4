"""
train.py -- train an encoder with SupCon (near-OOD synthetic images as hard negatives only),
SimCLR, triplet, cosine-pair or cross-entropy loss, then a linear classifier on the frozen
encoder, and report test accuracy and OOD detection on held-out classes.

The thesis's pipeline: contrastive pre-training of the encoder with the re-engineered SupCon
loss (supcon.py: Khosla et al. 2020, Eq. 2, with negative-only samples) on real images (+ ID
augmentations as extra positives, + near-OOD augmentations as negatives only), then a linear
classifier on the frozen encoder trained on the real (+ ID) images. `--loss ce` trains encoder
and classifier end to end (the baseline). The thesis put the negatives in the denominators
(--negative-mode denominators); by default a run now uses them only at the score (score: the
k-NN+neg score and outlier exposure on the probe), the negatives study's answer (README).
run(), the first function below, is that algorithm top to bottom, in the order of the paper and
of SupContrast's train():

    load the data (generating the synthetic set on a cache miss); build model and optimiser
    for every batch:  two augmented views -> encode -> loss -> backward -> optimiser step -> log
    at every epoch's end: a line in metrics.jsonl and a checkpoint (Steps: the loop's plumbing)
    then: linear probe on the frozen encoder, evaluation (evaluate.py), metrics.json

Run:   python train.py                                  # SupCon on sklearn's digits, CPU
       python train.py --loss triplet --mining semi_hard
       python train.py --data PATH --model resnet18 --image-size 64
       python train.py --synthetic DIR --positives id --negatives near_ood
       python train.py --train-steps 2000 ...           # the same compute in every setting
       python train.py --resume runs/<name>             # continue an interrupted run exactly
       torchrun --nproc_per_node=4 train.py --model resnet18 ...   # DistributedDataParallel
Results go to runs/<name>/: config.json, metrics.jsonl (per epoch), metrics.json, checkpoint.pt,
model.pt and report.md with its pictures.

Batches: labelled images come m per class (every anchor has a positive); negative-only images
ride on top (--negatives-per-batch x --batch-size of them), so a run with negatives sees the same
labelled images per step as one without, and their views come from a random stream of their own.
Several GPUs (torchrun): every process holds the data, embeds its shard of the global batch and
gathers all shards' embeddings *with* their gradients before the loss, so every anchor contrasts
the whole global batch and the gradients equal one process's on that batch. Rank 0 alone writes.
"""

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
import warnings

import torch
import torch.distributed.nn.functional as dist_nn  # all_gather with gradients (gather_rows)
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import dafusion  # makes the synthetic set on a cache miss (load_training_data)
import data
import evaluate  # the probe's features and the final metrics and report
import supcon  # losses, encoders and heads: the file that imports no other of ours

LOSSES = ("supcon", "simclr", "triplet", "cosine", "ce")  # ce: the cross-entropy baseline
# what a run does with its negative-only images (--negative-mode; supcon.py's docstring has each
# mechanism's equation): (a) the thesis's extra denominator terms; (b) only at the score, as an
# OOD reference of the k-NN score; (c) a head trained with the encoder; (d) pushed away from the
# class prototypes; (e) classes of their own, with their own positives
NEGATIVE_MODES = ("denominators", "score", "head", "prototypes", "classes")
# the mode of a run with negative-only images when --negative-mode is not typed: the negatives
# study's answer (benchmarks/results/negatives_study.md; with_defaults fills it in)
DEFAULT_NEGATIVE_MODE = "score"
# options that only some losses read: given with another loss they would do nothing
LOSS_OPTIONS = {"temperature": ("supcon", "simclr"), "base_temperature": ("supcon", "simclr"),
                "hard_negatives": ("supcon", "simclr"), "negative_weight": ("supcon", "simclr"),
                "chunk_size": ("supcon", "simclr"), "margin": ("triplet", "cosine"),
                "mining": ("triplet",), "distance": ("triplet",), "mining_scope": ("triplet",)}
# options a --negative-mode does not read, so typed with it they would do nothing: a weight and
# a rule are (a)'s, for negatives in the denominators; (b) puts no negative in any batch
NEGATIVE_MODE_IGNORES = {"score": ("negative_weight", "hard_negatives", "negatives_per_batch"),
                         "classes": ("negative_weight", "hard_negatives"),
                         "head": ("negative_weight", "hard_negatives"),  # (c), (d): no negative
                         "prototypes": ("negative_weight", "hard_negatives")}  # in Eq. 2 at all
# the options of one --negative-mode alone: {option: the modes that read it}
NEGATIVE_MODE_OPTIONS = {"head_loss": ("head",), "head_weight": ("head",),
                         "head_ce_weight": ("head",), "prototype_momentum": ("prototypes",),
                         "prototype_weight": ("prototypes",)}
# (c) --head-loss energy: the margins (m_in, m_out) of the energy hinges, a constant of this
# file, not an option (a value as "-7,-3" would read as an option to argparse). Liu et al.'s
# CIFAR code has -25, -7 for fine-tuning a pre-trained WideResNet, whose logits are large.
# A linear head trained from scratch beside SupCon starts at E = -log K (-2.1 for 8 classes):
# m_out = -3 leaves a negative alone until the head grows confident on it, and m_in = -7 asks an
# ID image for a top logit about 5 above that, which the head reaches in a short run. Measured
# once each (digits, 75 steps, 200 noise images as negatives, seed 0): -25, -7 scaled every ID
# logit up (median E -24) at a cost, head-energy AUROC 0.71 and probe accuracy 0.925; -7, -3
# gave 0.91 and 0.986 (outlier exposure: head MSP AUROC 0.96, 0.983). Another scale of logits
# (a large pre-trained network) may want Liu et al.'s
ENERGY_MARGINS = (-7.0, -3.0)
# what a run folder holds (written atomically; --resume removes the temporaries of a stop)
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt", "model.pt",
             "report.md", *evaluate.PICTURES.values())
# how the run's random streams derive from --seed (data.derive_seed); a checkpoint of another
# rule would resume with other batches and masks, so --resume refuses it
SEED_RULE = "derive_seed/sha256"
# what --resume may change: where and how fast the run computes, and how long it goes on
RESUME_MAY_CHANGE = {"device", "workers", "data_on", "compile", "no_report", "eval_every",
                     "epochs", "train_steps"}


# -----------------------------------------------------------------------------
# The algorithm
def run(args, run_dir, device, resumed=False):
    """Train in run_dir as args say; returns the metrics (rank 0; {} on the other ranks)."""
    rank, world = data.distributed()
    # ---- data: real training images (+ synthetic ID positives, + negative-only images)
    args, splits, train_set, near_ood = load_training_data(args, device)  # and says what it read
    _, C, H, _ = train_set.images.shape  # channels and side of every training image
    K = len(splits.classes)  # training classes (held-out OOD classes excluded)
    mean, std = (t.to(device) for t in data.channel_stats(splits.train.images))  # real images'
    augment_kind = args.augment if args.augment != "auto" else ("rotation" if C == 1 else "simclr")
    # two views for the contrastive losses; ce and dataset-scope triplets use one
    n_views = 1 if args.loss == "ce" or args.mining_scope == "dataset" else 2
    # (b) --negative-mode score: the negatives are only k-NN+neg's reference, in no batch, so the
    # encoder trains exactly as in a run without them (labelled rows come first: same indices)
    read_set = train_set  # every image read: finish() evaluates with its negatives
    if args.negative_mode == "score":
        train_set = train_set.subset(~train_set.negative_only)
    # ---- model, optimiser, schedule, seeded here: the same --seed starts from the same weights
    # whether the synthetic set was generated in this run or read from the cache
    torch.manual_seed(args.seed)  # the initial weights (and ce's classifier)
    model, classifier, opt = build_training(args, C, H, K, device, world)
    sched, per_epoch, total = build_schedule(args, opt, train_set)  # warm-up, cosine decay
    gens = Generators(args.seed, device)  # random streams: the views', the mining's
    probe = lambda: probe_accuracy(args, model, classifier, train_set, near_ood,  # noqa: E731
                                   splits.test, mean, std, device)  # --eval-every's
    # the plumbing: a --resume's checkpoint restored, config.json written, the epoch log opened
    steps = Steps(args, run_dir, resumed, device, train_set, per_epoch, total,
                  (model, classifier, opt, sched, gens), (mean, std), probe)
    step_model, step_classifier = step_modules(args, model, classifier, device, world)  # DDP
    # the loss, chosen once; --loss supcon (the default) with no negatives in the batches
    # (--negative-mode score) or in the denominators is make_loss's `contrastive`, which calls
    # supcon.supcon_loss (extended Eq. 2)
    loss_of = make_loss(args, gens.mining, K, model)
    # ---- the loop: for every batch, two views -> encode -> loss -> backward -> step -> log
    model.train()  # dropout on, batch norm on batch statistics
    with steps.guard():  # a Ctrl-C stops between steps, with a checkpoint where it stopped
        # x: (b, C, H, W) uint8, this process's rows of the batch, its n_labelled labelled rows
        # first; roles: the whole batch's (labels, negative_only, every_anchor), (B,) each, on
        # the CPU; sizes: the ranks' shares of the batch under torchrun, else None
        for epoch, step, x, n_labelled, roles, sizes in steps:  # from a resume's step on
            # V augmented views of each image: (b, V, C, H, W) floats
            views = make_views(x, n_labelled, augment_kind, n_views, gens, mean, std)
            # encode, then the loss, under bf16 autocast on CUDA (bf16 keeps fp32's exponent
            # range: no GradScaler needed); out: embeddings z (B, V, D), ce: logits (forward)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=views.is_cuda):
                out = forward(args, step_model, step_classifier, views, sizes, n_labelled)
                loss = loss_of(out, *roles, sizes)  # a scalar; SupCon: Eq. 2 (make_loss)
            opt.zero_grad(set_to_none=True)  # None: no memset, backward writes fresh tensors
            loss.backward()  # outside autocast; under DDP: gradients averaged over the ranks
            with steps.updating():  # the parameters change: a checkpoint must not see half
                train_step(opt, sched, loss_of)
            steps.log(loss, sizes, epoch, step)  # the whole batch's loss, read a step later
    if rank > 0:  # rank 0 alone trains the probe, evaluates and writes the results
        return {}
    return finish(args, run_dir, model, classifier, splits, read_set, near_ood, mean, std,
                  device, steps.minutes(), total)


def train_step(opt, sched, loss_of):
    """The update, after backward: the optimiser's step, the learning rate's, and the state
    the loss keeps (--negative-mode prototypes: loss_of.commit, outside_denominators)."""
    opt.step()
    sched.step()
    if hasattr(loss_of, "commit"):
        loss_of.commit()


# -----------------------------------------------------------------------------
# The step's parts: views, encoder, loss
class Generators:
    """The run's own random streams, stored in every checkpoint so --resume draws the same
    numbers: the labelled images' views, the negative-only images' views, triplet mining."""

    def __init__(self, seed, device):
        stream = lambda name: torch.Generator(device=device).manual_seed(  # noqa: E731
            data.derive_seed(seed, name))  # drawn on the device
        self.augment, self.mining, self.negatives = (stream(name) for name in
                                                     ("augment", "mining", "negatives"))


def make_views(images, n_labelled, how, n_views, gens, mean, std):
    """(b, C, H, W) uint8 -> (b, V, C, H, W) augmented float views. The labelled rows (first)
    draw from gens.augment, the negative-only rows after them from gens.negatives, so in one
    process labelled images get the same views whether or not negatives ride on their batch.
    (Under torchrun each rank draws the same stream for its own shard.)"""
    # [(labelled rows, their stream), (negative-only rows, theirs)]
    parts = [(images[:n_labelled], gens.augment), (images[n_labelled:], gens.negatives)]
    views = [torch.cat([data.augment(x, how, g, mean, std) for x, g in parts])
             for _ in range(n_views)]  # V of (b, C, H, W); b may be 0 (an empty triplet batch)
    layout = torch.channels_last if images.is_cuda else torch.contiguous_format  # NHWC on CUDA
    return torch.stack([v.contiguous(memory_format=layout) for v in views], 1)  # (b, V, C, H, W)


def forward(args, model, classifier, views, sizes=None, n_labelled=None):
    """The step's forward pass. views (b, V, C, H, W) of this process's rows -> ce: logits
    (b V, K) of them; dataset-scope triplets: (T, 3, D), each triplet's anchor, positive and
    negative (views are (3T, 1, ...)); the other losses: embeddings (B, V, D) of the whole batch,
    under torchrun gathered from every rank with their gradients (gather_rows), and under
    --negative-mode head the pair (embeddings, the head's logits (B, V, K)), both gathered, so
    the head's terms too see the whole batch. n_labelled: the first rows are labelled images,
    the rest negative-only ones: batch norm normalises the rest with the labelled rows'
    statistics, in a pass of their own (supcon.LabelledFirst); None: one pass over every row."""
    b, V = views.shape[:2]  # b rows of this rank, V views each
    x = views.flatten(0, 1)  # (b V, C, H, W), image-major
    if args.loss == "ce":  # the head is nn.Identity: model(x) is the encoder's features
        return classifier(model(x))
    if args.mining_scope == "dataset":  # the model runs even on 0 rows, so that DDP's
        return model(x).float().view(-1, 3, args.embedding_dim)  # gradient hooks fire
    # negative-only rows stay out of the labelled rows' batch-norm statistics, except under (e)
    # classes, where they are anchors with positives: labelled rows. The views are image-major:
    # the labelled images' views are the first n_labelled V rows
    keep_out = n_labelled is not None and args.negative_mode != "classes"
    # (c) --negative-mode head: the head's logits too, from the same encoder passes
    kw = {"with_logits": True} if args.negative_mode == "head" else {}
    # model: supcon.LabelledFirst around the encoder (step_modules), which takes n_labelled
    out = model(x, n_labelled * V, **kw) if keep_out else model(x, **kw)
    out = out if isinstance(out, tuple) else (out,)
    out = [o.float().view(b, V, -1) for o in out]  # (b, V, D) [and (b, V, K) logits]
    out = [gather_rows(o, sizes) if sizes else o for o in out]  # the whole batch, with gradients
    return tuple(out) if len(out) > 1 else out[0]  # (B, V, D) [, (B, V, K)]


def gather_rows(z, sizes):
    """Concatenate every rank's rows of z, keeping the autograd graph (torchrun only).

    z: (sizes[rank], ...) this rank's rows -> (sum(sizes), ...) in rank order. A plain
    all_gather returns tensors without gradients; torch.distributed.nn's version sends each
    rank's share of the gradient back in backward (a reduce-scatter: the SUM over ranks).
    Shards may differ in size by one: padded to the largest and cut back after."""
    pad = max(sizes) - z.shape[0]  # rows this rank lacks of the largest shard (0 or 1)
    z = F.pad(z, (0, 0) * (z.dim() - 1) + (0, pad))  # (max(sizes), ...)
    # W tensors (max(sizes), ...); gradients flow back through it
    return torch.cat([part[:n] for part, n in zip(dist_nn.all_gather(z), sizes)])


def make_loss(args, generator, num_classes=None, model=None):
    """The run's loss, chosen once from --loss: loss_of(out, labels, negative_only, every_anchor,
    sizes) -> scalar, with `out` as forward() returns it and the roles of the whole batch (best
    on the CPU: SupCon then does its row bookkeeping there and the GPU never waits for it).
    num_classes: K, the training classes (--negative-mode classes labels negatives K + g);
    model: the plain model, whose prototypes --negative-mode prototypes moves.

    Under torchrun every rank's loss has a gradient that, after DDP's average over ranks, equals
    one process's on the whole batch. Contrastive losses see all B rows (gathered), so every rank
    computes the same loss and backward sums the W ranks' gradients (DDP's average divides them
    out). Means over this rank's rows (cross-entropy, dataset-scope triplets) are scaled by
    b W / B, so that their average over ranks is the whole batch's (rank_share)."""
    def contrastive(z, labels, negative_only, every_anchor, sizes):  # Eq. 2; SimCLR: no labels
        return supcon.supcon_loss(z, labels if args.loss == "supcon" else None, negative_only,
                                  temperature=args.temperature,
                                  base_temperature=args.base_temperature,
                                  # a rule per image, True: a negative of its own class's
                                  # anchors only; False (every_anchor): of every anchor
                                  hard_negatives="all" if args.hard_negatives == "all"
                                  else ~every_anchor,
                                  negative_weight=args.negative_weight,
                                  chunk_size=args.chunk_size or None)  # 0 -> the plain path

    def negatives_as_classes(z, labels, negative_only, every_anchor, sizes):  # (e): Eq. 2 with
        return contrastive(z, *negative_classes(labels, negative_only, every_anchor,  # K + g
                                                num_classes), sizes)

    def cross_entropy(logits, labels, negative_only, every_anchor, sizes):
        start, b, scale = rank_share(sizes, len(labels))
        local = labels[start:start + b].repeat_interleave(len(logits) // max(1, b))  # (b V,)
        return F.cross_entropy(logits, data.to_device(local, logits.device)) * scale

    def dataset_triplets(z, labels, negative_only, every_anchor, sizes):  # z (T, 3, D)
        if not len(z):  # no triplet in this rank's share
            return z.sum() * 0.0
        return supcon.triplet_margin(z[:, 0], z[:, 1], z[:, 2], margin=args.margin,
                                     distance=args.distance) * rank_share(sizes, len(z))[2]

    def pairs_or_triplets(z, labels, negative_only, every_anchor, sizes):
        V = z.shape[1]  # every view is a sample of its image's class, with its image's role
        z, labels = z.flatten(0, 1), labels.repeat_interleave(V)  # (B V, D), (B V,)
        negative_only = negative_only.repeat_interleave(V)
        if args.loss == "triplet":  # mined in the batch
            return supcon.triplet_loss(z, labels, negative_only, margin=args.margin,
                                       mining=args.mining, distance=args.distance,
                                       generator=generator)
        return supcon.cosine_pair_loss(z, labels, negative_only, margin=args.margin)

    if args.loss == "ce":
        return cross_entropy
    if args.mining_scope == "dataset":
        return dataset_triplets
    if args.negative_mode == "classes":  # --loss supcon only (check_args)
        return negatives_as_classes
    if args.negative_mode in ("head", "prototypes"):  # --loss supcon only (check_args)
        return outside_denominators(args, model)
    return contrastive if args.loss in ("supcon", "simclr") else pairs_or_triplets


def rank_share(sizes, rows):
    """(this rank's first row, its rows b, the scale b W / B) of a batch whose ranks hold
    `sizes` rows each; in one process (sizes None): all `rows` rows, unscaled."""
    if not sizes:
        return 0, rows, 1.0
    rank, world = data.distributed()
    return sum(sizes[:rank]), sizes[rank], sizes[rank] * world / sum(sizes)


def negative_classes(labels, negative_only, every_anchor, num_classes):
    """(e) --negative-mode classes: a batch's roles with its negative-only images as classes of
    their own, SupCon anchors with positives like every other row (CSI's sup-CSI, Tack et al.
    2020: each (class, shift) pair its own label). A negative's label is K + g, g the anchors it
    was meant for in (a): g = c for a negative of class c (a synthetic variation of a class-c
    image; an image of --negative-data's c/ sub-folder), g = K for one meant for every anchor
    (the other --negative-data images: one group). labels, negative_only, every_anchor: (B,)
    -> the same with labels in [0, 2K] and negative_only all False."""
    group = torch.where(every_anchor, num_classes, labels)  # (B,) g in [0, K]
    labels = torch.where(negative_only, num_classes + group, labels)  # real rows keep their y
    return labels, torch.zeros_like(negative_only), every_anchor


def outside_denominators(args, model):
    """(c), (d): make_loss's loss_of for --negative-mode head or prototypes. Eq. 2 runs on the
    labelled rows alone, so no negative is in any denominator; the negatives enter only the
    head's outlier term (c: supcon.logit_head_loss on forward()'s logits) or the prototypes'
    terms (d: supcon.prototype_loss with model's prototypes buffer). (d)'s new prototypes are
    kept only when the step updates the weights: its loss_of has a commit() that train_step
    calls inside the update, so a checkpoint never holds the prototypes of a step whose weights
    it lacks. Under torchrun every rank sees the gathered batch: its prototypes stay the same."""
    def labelled_supcon(z, labels, negative_only):  # z (B, V, D) -> Eq. 2 of the labelled rows
        keep = torch.nonzero(~negative_only).squeeze(1)  # (R,) on the CPU
        return supcon.supcon_loss(z.index_select(0, data.to_device(keep, z.device)),
                                  labels[keep], temperature=args.temperature,
                                  base_temperature=args.base_temperature,
                                  chunk_size=args.chunk_size or None)  # 0 -> the plain path

    def with_head(out, labels, negative_only, every_anchor, sizes):  # out: (z, logits)
        z, logits = out  # (B, V, D), (B, V, K)
        return labelled_supcon(z, labels, negative_only) + supcon.logit_head_loss(
            logits, labels, negative_only, outlier_loss=args.head_loss,
            outlier_weight=args.head_weight, ce_weight=args.head_ce_weight,
            margins=ENERGY_MARGINS)

    pending = []  # (d): the step's new prototypes, until its update

    def with_prototypes(z, labels, negative_only, every_anchor, sizes):
        loss, mu = supcon.prototype_loss(z, labels, negative_only, model.prototypes,
                                         momentum=args.prototype_momentum,
                                         temperature=args.temperature,
                                         outlier_weight=args.prototype_weight)
        pending[:] = [mu]  # (K, D), detached
        return labelled_supcon(z, labels, negative_only) + loss

    def commit():  # inside the step's update: the prototypes move on with the weights
        model.prototypes.copy_(pending.pop())

    if args.negative_mode == "head":
        return with_head
    with_prototypes.commit = commit
    return with_prototypes


# -----------------------------------------------------------------------------
# Data, model, schedule
def load_training_data(args, device):
    """(settings, splits, training set, outliers): the real splits plus the synthetic images the
    flags ask for, generated into the cache first on a miss (settings then name the cache
    folder, so config.json says which set the run used), and --negative-data's images; the
    outliers are what --outlier-exposure reads (data.training_set). Says what it read."""
    splits = data.splits_from_args(args)  # train / test / held-out OOD test
    if not len(splits.test):
        raise data.DataError("--val-fraction 0 leaves no test images to evaluate on; give a "
                             "fraction above 0 or a PATH/test folder")
    if generates_synthetic(args):
        folder = dafusion.cached_synthetic_set(args, splits, device)  # ddpm; keyed by the settings
        args = data.settings(args, {"synthetic": folder})  # a copy: the caller's args stay
    train_set, near_ood = data.training_set(args, splits)  # near_ood: the outliers, or None
    # class sub-folders of --negative-data: negatives of their class's anchors only, a rule that
    # only SupCon's per-anchor denominators have (triplets and pairs use every negative-only
    # image for every anchor; SimCLR has no classes). --negative-mode score: no negative meets
    # an anchor, and k-NN+neg pools them all, whatever folder they are in
    in_class_folders = ~train_set.every_anchor & (train_set.kind == data.KIND_NEGATIVE)  # (N,)
    if args.negative_mode != "score" and (args.loss != "supcon" or args.hard_negatives == "all") \
            and bool(in_class_folders.any()):
        why = "--hard-negatives all" if args.loss == "supcon" else f"--loss {args.loss}"
        raise data.DataError(f"--negative-data {args.negative_data}: {why} sends every negative "
                             f"to every anchor, so its class sub-folders would have no effect; "
                             f"put every negative in the folder itself, or use --loss supcon")
    if args.negative_mode in ("head", "prototypes") and bool(in_class_folders.any()):
        raise data.DataError(f"--negative-data {args.negative_data}: --negative-mode "
                             f"{args.negative_mode} uses every negative alike (none enters an "
                             f"anchor's denominator), so its class sub-folders would have no "
                             f"effect; put every negative in the folder itself")
    say_data(args, splits, train_set, device)
    return args, splits, train_set, near_ood

def say_data(args, splits, train_set, device):
    """One line: the training images of each kind, the test set, the classes, those held out
    as OOD, the device."""
    count = lambda kind: int((train_set.kind == kind).sum())  # noqa: E731
    n_real, n_neg = count(data.KIND_REAL), count(data.KIND_NEGATIVE)  # n_real 0 with --no-real
    n_syn = count(data.KIND_ID) + count(data.KIND_NEAR_OOD)
    negative_data = "" if not n_neg else (
        f"{n_neg} real negatives from {args.negative_data} "
        f"({int(train_set.every_anchor.sum())} of every anchor, "
        f"{n_neg - int(train_set.every_anchor.sum())} of their class's), ")
    used = f"; negatives used by --negative-mode {args.negative_mode}" \
        if bool(train_set.negative_only.any()) else ""
    print(f"data {args.data}: {n_real} real training images, {n_syn} synthetic "
          f"({int((train_set.negative_only & (train_set.kind != data.KIND_NEGATIVE)).sum())} "
          f"negative-only), {negative_data}{len(splits.test)} test, {len(splits.classes)} classes; "
          f"held out as OOD: {splits.ood_classes or 'none'}; device {device}{used}")


def generates_synthetic(args):
    """True if the run needs the ddpm's synthetic set from the cache: a synthetic role without
    --synthetic (--outlier-exposure reads its near-OOD images unless --negative-data is given)."""
    wants = args.positives != "none" or args.negatives != "none" or \
        (args.outlier_exposure and not args.negative_data)
    return bool(wants and not args.synthetic)


def lr_factor(step, total_steps, warmup_steps):
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:  # large-batch SGD is unstable in its first steps (Goyal et al. 2017)
        return (step + 1) / warmup_steps  # 1/w, 2/w, ..., 1: step 0 already moves the weights
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1
    # cosine annealing (Loshchilov & Hutter 2017, SGDR), without restarts
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(args, opt, train_set):
    """(schedule, optimiser steps per epoch, optimiser steps of the whole run): the learning
    rate at step s is args.lr * lr_factor(s), a linear warm-up, then a cosine decay."""
    per_epoch = count_batches(args, train_set)  # a function of the set's sizes alone
    total = args.train_steps or args.epochs * per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else \
        int(args.warmup_epochs * per_epoch)  # warm-up epochs -> steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    return sched, per_epoch, total


def model_parts(args):
    """The parts a --negative-mode adds to the model, as supcon.build_model takes them (model.pt's
    "architecture" records them for evaluate.load_run): (c) the head trained with the encoder,
    named by its outlier term; (d) the class prototypes."""
    return {"logit_head": args.head_loss if args.negative_mode == "head" else None,
            "prototypes": args.negative_mode == "prototypes"}


def build_training(args, channels, size, num_classes, device, world):
    """The model (encoder + the loss's head), the linear classifier and the optimiser."""
    # classifier: nn.Linear(F, K) on the encoder features
    model, classifier = supcon.build_model(args.model, args.loss, channels, size, num_classes,
                                           args.embedding_dim, args.pretrained,
                                           **model_parts(args))
    if args.init_from:  # e.g. pre-trained on synthetic images, now fine-tuned on real ones
        path = os.path.join(args.init_from, "model.pt")
        init = data.load_torch_file(path, "--init-from")
        data.load_weights(model, init, "model", path, "--init-from")
        data.load_weights(classifier, init, "classifier", path, "--init-from")
    model, classifier = model.to(device), classifier.to(device)
    if device.type == "cuda":  # NHWC: the layout tensor cores convolve fastest in
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and args.sync_bn:  # batch statistics over all ranks' shards
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # contrastive losses train the encoder only; their linear probe trains after
    params = [*model.parameters(), *(classifier.parameters() if args.loss == "ce" else [])]
    if args.optimizer == "adamw":
        # AdamW: decoupled weight decay (Loshchilov & Hutter 2019)
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return model, classifier, opt


def step_modules(args, model, classifier, device, world):
    """What the step calls: DDP wrappers under torchrun (they average the gradients over the
    ranks) and torch.compile on request, around supcon.LabelledFirst (negative-only rows in a
    batch-norm pass of their own); `model` and `classifier` stay the plain modules saved."""
    step_model, step_classifier = supcon.LabelledFirst(model), classifier
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None  # gloo on the CPU: device_ids=None
        step_model = DistributedDataParallel(step_model, device_ids=ids)
        if args.loss == "ce":  # only ce trains its classifier inside the loop
            step_classifier = DistributedDataParallel(classifier, device_ids=ids)
    if args.compile:
        step_model = torch.compile(step_model)  # compiles on the first step's shapes
    return step_model, step_classifier


def count_batches(args, train_set):
    """Batches per epoch; a function of the set's sizes alone (not of the draws or a model)."""
    if args.loss == "ce":
        return math.ceil(len(train_set) / args.batch_size)  # shuffled batches, the last one shorter
    if args.mining_scope == "dataset":  # triplets of batch_size // 3, about batch_size images
        labelled = int((~train_set.negative_only).sum())  # negative-only rows are never anchors
        return max(1, math.ceil(labelled / max(1, args.batch_size // 3)))
    # groups of m per class, dealt round-robin into the batches
    return data.count_contrastive_batches(train_set.labels, train_set.negative_only,
                                          args.batch_size, args.m_per_class)


def epoch_batches(args, train_set, epoch, embeddings=None):
    """The index batches of one epoch, drawn from the epoch's own stream (data.epoch_generator).
    Dataset-scope triplet mining returns (T, 3) triplet batches mined on `embeddings` (N, D)."""
    g = data.epoch_generator(args.seed, epoch)  # own stream: a resumed epoch redraws them
    if args.mining_scope == "dataset":
        # a, p, n: (T,) indices into train_set
        a, p, n = supcon.mine_triplets(embeddings, train_set.labels, train_set.negative_only,
                                       margin=args.margin, mining=args.mining,
                                       distance=args.distance, generator=g)
        triplets = torch.stack([a, p, n], 1)[torch.randperm(len(a), generator=g)]  # (T, 3)
        return list(triplets.tensor_split(count_batches(args, train_set)))  # (t, 3) triplets each
    if args.loss == "ce":  # plain shuffled batches
        return list(torch.randperm(len(train_set), generator=g).split(args.batch_size))
    # (b,) index tensors, labelled rows first, negative-only rows after them
    return data.contrastive_batches(train_set.labels, train_set.negative_only, args.batch_size,
                                    args.m_per_class, args.negatives_per_batch, g,
                                    train_set.every_anchor)


def data_placement(args, images, device):
    """--data-on auto: the training set goes to the GPU when it takes less than half of the free
    memory (the rest is for the model and the activations), else it stays in host memory."""
    if args.data_on != "auto":
        return args.data_on
    if device.type != "cuda":  # CPU (and Apple's unified memory): host and device are one
        return "device"
    free_bytes, _ = torch.cuda.mem_get_info(device)  # cudaMemGetInfo: (free, total) bytes
    return "device" if images.nbytes < free_bytes / 2 else "host"  # uint8: N C H W bytes


def batch_stream(images, batches, first, data_on, device, workers):
    """(step, batch, this rank's rows, their uint8 images on the device) for batches[first:].
    data_on "host": DataLoader workers gather the images into pinned memory a few batches ahead
    and the copy overlaps the previous step; "device": indexed on the device."""
    rank, world = data.distributed()
    # an iterator of each batch's (b_rank, C, H, W) uint8 images, or None
    fetched = data.host_batches(images, batches, first, rank, world, workers,
                                pin_memory=device.type == "cuda") if data_on == "host" else None
    for step in range(first, len(batches)):
        rows = batches[step].tensor_split(world)[rank]  # this rank's shard (all of it alone)
        if fetched is not None:  # gathered by a worker, pinned: the copy does not wait
            local = next(fetched)
        else:
            local = images[data.to_device(rows.flatten(), device)]  # indexed on the device, no copy
        yield step, batches[step], rows, data.to_device(local, device)  # host: pinned, non-blocking


# -----------------------------------------------------------------------------
# After training: the linear probe and the evaluation
def train_linear(args, features, labels, num_classes, device, seed, outliers=None):
    """Linear classifier on frozen encoder features (N, F): AdamW, cosine schedule, seeded.
    outliers (M, F): with --outlier-exposure lambda, each step also adds lambda times the
    cross-entropy of a batch of outliers to the uniform distribution (Hendrycks et al. 2019,
    Sec. 4.3: E[-log f_y(x)] + lambda E_x'[H(U; f(x'))], an equation the paper leaves unnumbered)."""
    g = torch.Generator().manual_seed(seed)  # the batch order of the probe
    torch.manual_seed(seed)  # its initial weights
    classifier = nn.Linear(features.shape[1], num_classes).to(device)  # W (K, F), b (K,)
    # standardised features (the statistics are folded into the layer at the end)
    mu, sigma, quiet = probe_standardisation(features)  # (F,) each
    # a quiet feature is left out: input 0 and weight 0, so its gradient is 0 and it stays 0
    standardise = lambda f: ((f - mu) / sigma).masked_fill(quiet, 0.0).to(device)  # noqa: E731
    with torch.no_grad():
        classifier.weight[:, quiet.to(device)] = 0.0
    x, y = standardise(features), labels.to(device)  # (N, F), (N,) on the device
    oe = args.outlier_exposure if outliers is not None and len(outliers) else 0.0  # lambda, or 0
    # the outliers on the same features: a unit quiet on the probe images stays out even where
    # outliers light it (it has no scale to be standardised by, and the ID term no say on it)
    x_out = standardise(outliers) if oe else None  # (M, F)
    opt = torch.optim.AdamW(classifier.parameters(), lr=1e-2, weight_decay=1e-4)  # convex
    steps = args.linear_epochs * math.ceil(len(x) / 256)  # batches of 256
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 0))  # no warm-up
    for _ in range(args.linear_epochs):
        # the order is drawn on the CPU (the same on every device), moved over once an epoch
        for idx in torch.split(torch.randperm(len(x), generator=g).to(device), 256):
            loss = F.cross_entropy(classifier(x[idx]), y[idx])  # batch mean of -log p(y | x)
            if oe:  # -mean log-softmax = cross-entropy to the uniform distribution
                # as many outliers as ID rows, drawn with replacement
                pick = torch.randint(len(x_out), (len(idx),), generator=g).to(device)
                loss = loss - oe * classifier(x_out[pick]).log_softmax(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():  # fold the standardisation in: W (x - mu) / sigma + b
        w = classifier.weight / sigma.to(device)  # (K, F)
        classifier.bias -= (w * mu.to(device)).sum(1)  # b' = b - W mu / sigma
        classifier.weight.copy_(w)  # W' = W / sigma: the same logits on raw features
    return classifier


# a probe feature whose std is under this fraction of the median std of the features that vary
# is quiet: left out of the probe (probe_standardisation says why)
PROBE_QUIET = 0.01


def probe_standardisation(features):
    """features (N, F) -> mu (F,), sigma (F,) to standardise them by, and quiet (F,) bool: the
    features whose std is under PROBE_QUIET times the median std of the live ones (std > 0),
    which train_linear leaves out (input 0, weight 0; sigma 1 there, as it multiplies 0).

    Why: the fit's weight W on standardised features is folded into W / sigma on raw ones. A
    feature silent on every probe image (a dead ReLU unit, std 0) gets no gradient and kept its
    random initial weight, which the old floor of 1e-6 multiplied by 1e6 (default digits run: 47
    of 128 features dead, folded weights ~88,000 against a median 2.1): any test image that
    woke such a unit got a near one-hot softmax. A near-dead one (std tiny, nonzero) blows up the
    same way, and flooring its sigma does not stop it: AdamW moves every weight at about the same
    speed whatever its gradient's scale, so a weight learnt from 1e-5-scale noise is as large as
    a real one, and any floor well under the live stds still multiplies it by live std / floor.
    A direction the probe images barely span has no weight the data can set: leaving it out is
    the one choice that adds nothing arbitrary. The threshold is relative, as encoder features
    have no fixed scale, and small: only features 100 times quieter than the typical one go.
    Features without a quiet one are standardised exactly as by their plain mean and std."""
    mu, std = features.mean(0), features.std(0)  # (F,) each
    varying = std > 0  # the median of the live features: dead ones would drag it to 0
    scale = std[varying].median() if varying.any() else std.new_tensor(1.0)
    quiet = std < PROBE_QUIET * scale  # (F,) bool; every dead feature among them
    return mu, std.masked_fill(quiet, 1.0), quiet


def fit_probe(args, model, classifier, train_set, near_ood, mean, std, device, num_classes):
    """The classifier evaluated: a fresh linear probe on the frozen encoder's features of the
    probe set (real + ID images, never near-OOD ones), or ce's own head."""
    if args.loss == "ce":
        return classifier
    probe_set = train_set.probe_set()
    features = evaluate.extract_features(model, probe_set.images, mean, std, device)  # (N, F)
    outliers = None
    if args.outlier_exposure and near_ood is not None:
        outliers = evaluate.extract_features(model, near_ood.images, mean, std, device)  # (M, F)
    return train_linear(args, features, probe_set.labels, num_classes, device, args.seed, outliers)


def probe_accuracy(args, model, classifier, train_set, near_ood, test, mean, std, device):
    """Test accuracy of the probe on the current encoder, for --eval-every. It runs on a copy
    of the random state, so training draws the same numbers afterwards (resume stays exact)."""
    # saves and restores the CPU generator (and the GPU's on CUDA) around the probe
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = fit_probe(args, model, classifier, train_set, near_ood, mean, std, device,
                          len(test.classes))
        test_f = evaluate.extract_features(model, test.images, mean, std, device)  # (N_test, F)
        with torch.no_grad():
            predicted = probe(test_f.to(device)).argmax(1).cpu()  # (N_test,) class ids on the CPU
    return (predicted == test.labels).float().mean().item()


def finish(args, run_dir, model, classifier, splits, train_set, near_ood, mean, std, device,
           minutes, steps):
    """Linear probe, model.pt, the evaluation of evaluate.py, metrics.json; the results."""
    classifier = fit_probe(args, model, classifier, train_set, near_ood, mean, std, device,
                           len(splits.classes))
    arch = {**{k: getattr(args, k) for k in ("model", "loss", "embedding_dim")},  # to rebuild
            **model_parts(args)}  # it, with (c)'s head or (d)'s prototypes
    state = {"model": model.state_dict(), "classifier": classifier.state_dict(),
             "mean": mean.cpu(), "std": std.cpu(), "classes": splits.classes, "architecture": arch}
    # what evaluate.py's load_run reads back
    data.save_torch(os.path.join(run_dir, "model.pt"), state)
    # epochs: fractional when --train-steps cuts the last one
    results = {"train_minutes": minutes, "epochs": steps / count_batches(args, train_set),
               "optimizer_steps": steps,
               **evaluate.evaluate(model, classifier, splits, mean, std, device, run_dir,
                                   train_set.synthetic(), pictures=not args.no_report,
                                   seed=args.seed,  # the negatives: k-NN+neg's OOD reference
                                   negatives=train_set.subset(train_set.negative_only))}
    data.write_text(os.path.join(run_dir, "metrics.json"), json.dumps(results, indent=2))
    line = (f"test accuracy {results['test_accuracy']:.4f} (k-NN {results['knn_accuracy']:.4f}, "
            f"k-NN top-5 hit {results['knn_top5_hit']:.4f})")
    if "ood_auroc_knn" in results:
        line += (f"; OOD AUROC on held-out {','.join(splits.ood_classes)}: k-NN "
                 f"{results['ood_auroc_knn']:.4f}, MSP {results['ood_auroc_msp']:.4f}")
    if "ood_auroc_knn_neg" in results:  # the negatives as an OOD reference too (k-NN+neg)
        line += f", {evaluate.KNN_NEG} {results['ood_auroc_knn_neg']:.4f}"
    if "ood_auroc_head" in results:  # (c): the head trained with the encoder, its own score
        line += f", head {results['ood_auroc_head']:.4f}"
    report = "" if args.no_report else f" (report: {os.path.join(run_dir, 'report.md')})"
    print(f"{line}; {steps} steps, {minutes:.2f} min of training; results in {run_dir}{report}")
    return results


# -----------------------------------------------------------------------------
# Plumbing: the command line and the run folder
def main(argv=None):
    """Parse the arguments, open the run folder (new, or --resume's) and train."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # under torchrun: join the process group (rank 0 alone prints from here on); run_command
    # leaves it after a clean end, and after an error ends the process at once
    device = data.init_distributed(data.pick_device(args.device))
    args, run_dir, resumed = open_run(parser, args, argv)  # with defaults, or --resume's saved
    lead = data.distributed()[0] == 0  # rank 0 holds the folder and writes in it
    # while the run goes on, a --resume of it started elsewhere is refused
    busy = f"--resume {run_dir}: another process is running this run now; wait for it to end"
    try:
        with data.folder_lock(run_dir, busy) if lead else contextlib.nullcontext():
            return run(args, run_dir, device, resumed)
    except data.DiskFull as error:  # what to do once space is freed
        if os.path.exists(os.path.join(run_dir, "config.json")):
            error.then = f"continue with: python train.py --resume {run_dir}"
        raise
    finally:  # a new run that stopped before writing anything leaves no folder
        if lead and not resumed and os.path.isdir(run_dir) and not os.listdir(run_dir):
            os.rmdir(run_dir)


def build_parser():
    """train.py's command line: data, synthetic data, model, loss, optimisation, run."""
    p = data.add_synthetic_arguments(data.add_data_arguments(data.Parser(__doc__, "train.py")))
    b = p.add_argument_group("batches")
    # up to 10x: negatives may outnumber the labelled rows
    b.add_argument("--negatives-per-batch", type=data.float_in(0, 10), default=0.25,
                   help="negative-only images per batch, as a share of --batch-size, on top of "
                        "the labelled images (when the run has negatives)")
    # at least 2: a group of one image would give its anchor no positive
    b.add_argument("--m-per-class", type=data.int_at_least(2), default=4,
                   help="labelled images come in groups of m per class, so anchors have positives")
    dafusion.add_generation_arguments(p)  # for --positives/--negatives without --synthetic
    m = p.add_argument_group("model")
    m.add_argument("--model", default="cnn", choices=["cnn", *supcon.RESNETS],
                   help="cnn: the fruit project's small CNN; ResNets get a 3x3 stem up to 64 px")
    m.add_argument("--pretrained", action="store_true",
                   help="ImageNet weights (ResNets; must be in torchvision's cache)")
    # D of z (B, V, D); 128 as in Khosla et al.'s projection head
    m.add_argument("--embedding-dim", type=data.int_at_least(1), default=128,
                   help="output size of the projection head")
    add_loss_arguments(p)  # --loss, and what each loss and --negative-mode read
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=data.int_at_least(1), default=30,
                   help="passes over the labelled training images")
    o.add_argument("--train-steps", type=data.int_at_least(1), default=None,
                   help="the run's optimiser steps, whatever the training set's size (instead of "
                        "--epochs): equal compute for settings with more or fewer images")
    o.add_argument("--batch-size", type=data.int_at_least(2), default=256,
                   help="labelled images per batch (x2 views); negatives ride on top")
    o.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="SGD has momentum 0.9")
    # None until with_defaults(): its default depends on --optimizer
    o.add_argument("--lr", type=data.float_at_least(0, strict=True), default=None,
                   help="default: 1e-3 AdamW, 0.05 SGD")
    o.add_argument("--weight-decay", type=data.float_at_least(0), default=1e-4,
                   help="L2 penalty of the optimiser")
    o.add_argument("--warmup-epochs", type=data.float_at_least(0), default=1.0,
                   help="linear warm-up, then cosine decay")
    o.add_argument("--warmup-steps", type=data.int_at_least(0), default=None,
                   help="the warm-up in optimiser steps (instead of --warmup-epochs): the same "
                        "schedule for settings whose epochs differ in length")
    o.add_argument("--linear-epochs", type=data.int_at_least(1), default=100,
                   help="linear classifier on frozen features")
    # 0 = off: the weight of the OE term in train_linear
    o.add_argument("--outlier-exposure", type=data.float_at_least(0), default=None,
                   metavar="LAMBDA", help="the linear classifier also learns a uniform softmax "
                   "on the near-OOD images (Hendrycks et al. 2019; their lambda 0.5). Default: "
                   "0.5 with --negative-mode score, else 0 (off)")
    # 0 = never: each probe costs a feature pass and a linear fit
    o.add_argument("--eval-every", type=data.int_at_least(0), default=0, metavar="N",
                   help="every N epochs, a linear probe's test accuracy in metrics.jsonl")
    o.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or e.g. cpu, cuda:1")
    o.add_argument("--data-on", choices=["auto", "device", "host"], default="auto",
                   help="where the decoded uint8 training set lives. device: copied once to the "
                        "device (fastest); host: stays in host memory, DataLoader workers gather "
                        "each batch into pinned memory (sets larger than the GPU's memory). auto: "
                        "device when the set takes under half of the GPU's free memory")
    o.add_argument("--workers", type=data.int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes of --data-on host")
    o.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    o.add_argument("--sync-bn", action="store_true",  # nn.SyncBatchNorm (build_training)
                   help="under torchrun: batch-norm statistics over the global batch")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs", help="parent folder of run folders")
    r.add_argument("--name", default=None, help="run folder name (default: loss-data-time)")
    r.add_argument("--resume", default=None, metavar="RUN",  # settings from RUN/config.json
                   help="continue the run in folder RUN (more --epochs / --train-steps: to the "
                        "new total)")
    r.add_argument("--no-report", action="store_true", help="metrics only: no pictures")
    r.add_argument("--init-from", default=None, metavar="RUN",  # RUN/model.pt: model + classifier
                   help="start from a finished run's weights (pre-train on synthetic, fine-tune)")
    return p


def add_loss_arguments(p):
    """build_parser's loss group: --loss, --negative-mode, and the options they read."""
    ls = p.add_argument_group("loss")
    ls.add_argument("--loss", choices=LOSSES, default="supcon",
                    help="supcon, simclr (labels ignored), triplet, cosine (pairs), ce (baseline)")
    # tau of Eq. 2 (supcon.py); 0.1 as in Khosla et al.'s experiments
    ls.add_argument("--temperature", type=data.float_at_least(0, strict=True), default=0.1,
                    help="SupCon / SimCLR tau")
    ls.add_argument("--base-temperature", type=data.float_at_least(0, strict=True), default=None,
                    help="multiply the SupCon loss by tau/base (the reference code's 0.07)")
    ls.add_argument("--hard-negatives", choices=["same_class", "all"], default=None,
                    help="which anchors a negative-only image contrasts: its source class's "
                         "(default for supcon) or every one (default and only choice for simclr)")
    ls.add_argument("--negative-mode", choices=NEGATIVE_MODES, default=None,
                    help="how negative-only images are used: denominators (the thesis: in the "
                         "anchors' SupCon denominators), score (only at the score: the k-NN+neg "
                         "score's OOD reference and the probe's outlier exposure; the default, "
                         "after the negatives study), head (an outlier-exposure / energy head "
                         "trained with the encoder), prototypes (pushed from class prototypes), "
                         "classes (classes of their own)")
    # (c) the head's outlier term (supcon.logit_head_loss) and its weights beside SupCon
    ls.add_argument("--head-loss", choices=supcon.HEAD_LOSSES, default="oe",
                    help="--negative-mode head: the negatives' term, oe (outlier exposure: "
                         "cross-entropy to the uniform distribution; score: the head's MSP) or "
                         "energy (squared hinges at the energy margins %g, %g; score: minus "
                         "the head's energy)" % ENERGY_MARGINS)
    ls.add_argument("--head-weight", type=data.float_at_least(0), default=None, metavar="LAMBDA",
                    help="--negative-mode head: lambda, the weight of that term (default: 0.5 "
                         "for oe, 0.1 for energy, as in their papers)")
    ls.add_argument("--head-ce-weight", type=data.float_at_least(0), default=1.0, metavar="BETA",
                    help="--negative-mode head: the weight of the head's cross-entropy beside "
                         "SupCon's loss (default 1)")
    # (d) CIDER's EMA prototypes (supcon.prototype_loss)
    ls.add_argument("--prototype-momentum", type=data.float_in(0, 1, high_open=True),
                    default=0.95, metavar="ALPHA",
                    help="--negative-mode prototypes: alpha of mu <- Normalize(alpha mu + "
                         "(1 - alpha) z), one labelled embedding at a time (CIDER's 0.95 for "
                         "10 classes)")
    ls.add_argument("--prototype-weight", type=data.float_at_least(0), default=1.0,
                    metavar="LAMBDA", help="--negative-mode prototypes: the weight of the term "
                    "that pushes the negatives from every class prototype (default 1)")
    ls.add_argument("--negative-weight", type=data.float_at_least(0), default=1.0,  # w_a of Eq. 2
                    help="w, the weight of negative-only exp-terms (0: in the batch, not the loss)")
    # 1024, not supcon_loss's size-picked default: the same sums in the same order as every run
    # before it, so earlier runs repeat bit for bit (train.py's batches are small: the chunk's
    # speed hardly matters here)
    ls.add_argument("--chunk-size", type=data.int_at_least(0), default=1024,  # 0 -> chunk_size=None
                    help="SupCon anchors per block of the exact chunked path (memory about 4 x "
                         "this x N bytes; larger blocks run faster on a GPU); 0 = the plain path")
    ls.add_argument("--margin", type=data.float_at_least(0), default=None,
                    help="triplet (default 0.5) / cosine (default 0.0)")
    ls.add_argument("--mining", choices=supcon.MINING, default="random", help="triplet mining")
    ls.add_argument("--distance", choices=["euclidean", "cosine"], default="euclidean",
                    help="triplet distance")
    # dataset: mined on the head's embeddings, extract_features(head=True)
    ls.add_argument("--mining-scope", choices=["batch", "dataset"], default="batch",
                    help="triplets mined in each batch, or over the whole set once per epoch")
    ls.add_argument("--augment", choices=["auto", "none", "rotation", "simclr"], default="auto",
                    help="views for training (auto: rotation for greyscale, simclr for colour)")


def check_args(args, given):
    """Refuse combinations that cannot work, each with one line that says how to fix it.
    given: the options typed on the command line."""
    check_negative_mode(args, given)
    uses_synthetic = args.positives != "none" or args.negatives != "none"  # a synthetic role is set
    refuse = [  # (condition that makes the run fail, the one line that says the fix)
        (args.negatives != "none" and args.loss == "ce", "--negatives needs a contrastive loss "
         "(--loss supcon, simclr, triplet or cosine): cross-entropy cannot use negative-only "
         "images"),
        (args.negative_data and args.loss == "ce", "--negative-data needs a contrastive loss "
         "(--loss supcon, simclr, triplet or cosine): cross-entropy cannot use negative-only "
         "images"),
        (args.loss == "simclr" and args.hard_negatives == "same_class", "--loss simclr has no "
         "classes to mask negatives by: use --hard-negatives all (its default)"),
        # outlier exposure reads the set's near-OOD images, unless --negative-data gives its own
        (args.synthetic and not uses_synthetic and not (args.outlier_exposure and
                                                        not args.negative_data), "--synthetic DIR "
         "given but not used: add --positives id and/or --negatives near_ood"),
        (args.positives == "id+near_ood" and args.negatives != "none", "--positives id+near_ood "
         "uses the near-OOD images as positives; drop --negatives"),
        (args.no_real and args.positives == "none", "--no-real leaves nothing to train on: add "
         "--positives id"),
        (args.mining_scope == "dataset" and args.loss != "triplet",
         "--mining-scope dataset is for --loss triplet"),
        (args.batch_size < args.m_per_class, f"--batch-size {args.batch_size} is smaller than "
         f"--m-per-class {args.m_per_class}: a batch must hold one group of a class"),
        # the n_neg of data.contrastive_batches would be 0
        (has_negatives(args) and args.negative_mode != "score" and
         round(args.batch_size * args.negatives_per_batch) == 0,
         f"--negatives-per-batch {args.negatives_per_batch} x --batch-size {args.batch_size} "
         f"rounds to no negative per batch; raise it (0.25 is the default)"),
        (args.outlier_exposure and (args.loss == "ce" or not (args.synthetic or uses_synthetic
                                                              or args.negative_data)),
         "--outlier-exposure trains the linear probe of a contrastive run on outliers: it needs "
         "--negative-data PATH or --synthetic DIR (or --positives id), and a contrastive --loss"),
        # files named on the command line: checked now, not after the data has loaded
        (args.init_from and not os.path.isfile(os.path.join(args.init_from, "model.pt")),
         f"--init-from {args.init_from}: no model.pt there; pass a finished run folder"),
    ]
    for wrong, message in refuse:  # the first failing check wins: one line, not a list
        if wrong:
            raise data.DataError(message)
    data.refuse_without_effect(given, LOSS_OPTIONS, args.loss, f"with --loss {args.loss}")
    data.refuse_both(given, "warmup_epochs", "warmup_steps", "drop one")
    dafusion.refuse_two_strengths(given)
    data.check_named_files(args)  # --masks, --synthetic, --negative-data
    if generates_synthetic(args):  # the cache it generates into, before the data loads
        data.writable_folder(dafusion.CACHE_ROOT, "the synthetic cache", "run train.py where it "
                             "can write, or make a set with dafusion.py --out DIR and pass "
                             "--synthetic DIR")


def check_negative_mode(args, given):
    """--negative-mode's refusals, one line each: a mode other than (a) needs negative-only
    images, (c), (d) and (e) need SupCon's labels, and an option the mode does not read is not
    typed."""
    mode = args.negative_mode
    if mode != "denominators" and not has_negatives(args):
        raise data.DataError(f"--negative-mode {mode} is about negative-only images and this run "
                             f"has none: add --negative-data PATH or --negatives near_ood")
    if mode == "classes" and args.loss != "supcon":
        raise data.DataError(f"--negative-mode classes gives the negatives labels of their own, "
                             f"which only SupCon's Eq. 2 reads: use --loss supcon, not "
                             f"--loss {args.loss}")
    if mode in ("head", "prototypes") and args.loss != "supcon":
        raise data.DataError(f"--negative-mode {mode} trains its terms beside SupCon's Eq. 2 on "
                             f"the labelled images: use --loss supcon, not --loss {args.loss}")
    # {option: the modes that read it}, the form refuse_without_effect takes
    ignores = NEGATIVE_MODE_IGNORES
    used_by = {dest: tuple(m for m in NEGATIVE_MODES if dest not in ignores.get(m, ()))
               for ignored in ignores.values() for dest in ignored}
    defaulted = "negative_mode" not in given and has_negatives(args)
    where = f"with --negative-mode {mode}" + (" (the default with negatives; the thesis's way "
                                              "is --negative-mode denominators)" if defaulted
                                              else "")
    data.refuse_without_effect(given, used_by, mode, where)
    data.refuse_without_effect(given, NEGATIVE_MODE_OPTIONS, mode, where)


def has_negatives(args):
    """True if the run has negative-only images: synthetic ones (--negatives) or real ones."""
    return args.negatives != "none" or bool(args.negative_data)


def with_defaults(args):
    """A copy of args with the defaults that depend on other options filled in."""
    defaults = {"margin": 0.5 if args.loss == "triplet" else 0.0,  # the seed projects' margins
                "lr": 1e-3 if args.optimizer == "adamw" else 0.05,
                # SimCLR has no classes to match negative-only images to
                "hard_negatives": "all" if args.loss == "simclr" else "same_class",
                # (c)'s lambda: outlier exposure's 0.5 (Hendrycks et al. 2019), the energy
                # objective's 0.1 (Liu et al. 2020)
                "head_weight": 0.5 if args.head_loss == "oe" else 0.1}
    # a run without negative-only images reads no mode: denominators, the one that adds nothing
    mode = args.negative_mode or (DEFAULT_NEGATIVE_MODE if has_negatives(args) else
                                  "denominators")
    # (b) uses the negatives only at the score: k-NN+neg, and the probe's MSP through outlier
    # exposure on them (lambda 0.5, Hendrycks et al. 2019) -- on near-OOD or real negatives, not
    # on --negatives id, the placebo. Every other mode keeps it off, so --negative-mode
    # denominators is the thesis's run exactly
    outliers = args.negatives == "near_ood" or bool(args.negative_data)
    defaults |= {"negative_mode": mode,
                 "outlier_exposure": 0.5 if mode == "score" and outliers else 0.0}
    return data.settings(args, data.unset_only(args, defaults))


def open_run(parser, args, argv):
    """(settings, run folder, resumed?) A new run claims a new folder now, before any data loads
    (claim_run_folder; rank 0 claims, the other ranks take its name). --resume keeps the run's
    saved settings; options typed beside it must be ones a resumed run can honour."""
    given = data.given_options(parser, argv)  # what was typed, as opposed to argparse's defaults
    data.refuse_both(given, "epochs", "train_steps", "--train-steps sets the run's length; drop "
                     "one")
    if not args.resume:
        args = with_defaults(args)  # the checks read the values the run will have
        check_args(args, given)
        rank, world = data.distributed()
        claimed = [None]  # a one-element list: broadcast_object_list fills it in place
        if rank == 0:
            try:
                claimed = [claim_run_folder(args)]
            except data.DataError as error:  # sent to the other ranks too: none waits forever
                claimed = [error]
        if world > 1:
            torch.distributed.broadcast_object_list(claimed, src=0)
        if isinstance(claimed[0], Exception):  # rank 0 says why; the others end quietly
            raise claimed[0] if rank == 0 else data.OtherRankFailed()
        return args, claimed[0], False
    run_dir = args.resume
    # options added after the run started; a run saved before --negative-mode and
    # --outlier-exposure existed trained the thesis's way, with neither
    defaults = vars(parser.parse_args([])) | {"negative_mode": "denominators",
                                              "outlier_exposure": 0.0}
    # read strictly: each value as this command line would give it, null only where a run of
    # default settings writes null (with_defaults fills --lr, --margin, --hard-negatives)
    saved = data.read_run_settings(run_dir, "--resume ", parser,
                                   vars(with_defaults(parser.parse_args([]))), set(defaults))
    # options typed beside --resume that would change the run (equal to the saved value: fine)
    changed = data.changed_settings({**defaults, **saved}, vars(args),
                                    sorted(given - RESUME_MAY_CHANGE - {"resume"}))
    if changed:
        key, old, new = changed[0]
        raise data.DataError(f"--resume continues the run as it was set up: --"
                             f"{key.replace('_', '-')} cannot change (the run has {old!r}, not "
                             f"{new!r}); start a new run to change it")
    if "epochs" in given and saved.get("train_steps"):  # --epochs is ignored under train_steps
        raise data.DataError("--resume: the run's length is --train-steps "
                             f"{saved['train_steps']}; extend it with --train-steps")
    # later wins: defaults < the saved config < the overrides allowed
    return data.settings(defaults, saved, {k: getattr(args, k) for k in given & RESUME_MAY_CHANGE},
                         {"resume": run_dir}), run_dir, True


def claim_run_folder(args):
    """A new run's folder, made with one exclusive os.mkdir (it fails if the folder exists), so
    that runs started in the same second -- a shell loop over seeds -- never share one. A taken
    --name is refused; the default name (loss-data-time) takes the next free -2, -3, ..."""
    data_name = data.ascii_name(os.path.basename(str(args.data).rstrip("/\\")))
    name = args.name or f"{args.loss}-{data_name or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"--out {args.out}: cannot create it ({error.strerror or error}); "
                             f"choose another --out") from error
    for n in itertools.count(1):
        run_dir = os.path.join(args.out, name if n == 1 else f"{name}-{n}")
        try:
            os.mkdir(run_dir)  # atomic: of two processes, exactly one makes it
            return run_dir
        except FileExistsError:
            if args.name:
                raise data.DataError(f"{run_dir} already exists; choose another --name, or "
                                     f"continue the run there with --resume {run_dir}") from None
        except OSError as error:
            raise data.DataError(f"--out {args.out}: cannot make a run folder there "
                                 f"({error.strerror or error}); choose another --out") from error


# -----------------------------------------------------------------------------
# Plumbing: resume, checkpoints, Ctrl-C and the log -- what makes a stopped run continue exactly
class Steps:
    """The loop's plumbing, around run()'s algorithm. Iterating yields the steps that train, from
    where the run stands (its start, or the step a --resume's checkpoint.pt stopped before) to
    its last; between them it keeps what makes a stop resumable exactly: a checkpoint mark after
    every step, and at each epoch's end the epoch's line in metrics.jsonl and checkpoint.pt.
    guard() turns a Ctrl-C into a stop between steps with a checkpoint there, updating() marks
    the update a checkpoint must not see half of, log() takes each step's loss."""

    def __init__(self, args, run_dir, resumed, device, train_set, per_epoch, total, parts,
                 mean_std, probe):
        """parts: (model, classifier, opt, sched, gens), restored from a --resume's checkpoint;
        mean_std: the real images' channel statistics; probe: --eval-every's test accuracy.
        Writes config.json (rank 0) and opens the epoch log."""
        model, classifier, opt, self.sched, gens = parts
        self.args, self.run_dir, self.device, self.train_set = args, run_dir, device, train_set
        self.per_epoch, self.total, self.probe = per_epoch, total, probe
        # the set's embeddings, for dataset-scope triplets mined at each epoch's start
        self.embed = lambda: evaluate.extract_features(  # noqa: E731
            model, train_set.images, *mean_std, device, head=True)
        self.checkpoint = Checkpoint(run_dir, model, classifier, opt, self.sched, gens, device)
        # a run stopped before its first checkpoint resumes from its first step
        restored = resumed and os.path.exists(self.checkpoint.path)
        epoch0, step0, log_state = self.checkpoint.restore() if restored else (0, 0, {})
        self.start = (epoch0, step0)  # 0-based epoch
        done = epoch0 * per_epoch + step0  # optimiser steps already taken
        if resumed:
            check_resumable(run_dir, done, total)
            print(f"resumed {run_dir} at epoch {epoch0 + 1}, step {step0}: {done} of {total} steps"
                  + ("" if restored else " (it stopped before its first checkpoint)"))
        if data.distributed()[0] == 0:  # the settings, in the folder claimed before the data loaded
            if resumed:  # the temporaries a stop may have left are never a finished file
                data.remove_temporaries(os.path.join(run_dir, name) for name in RUN_FILES)
            data.write_text(os.path.join(run_dir, "config.json"), json.dumps(vars(args), indent=2))
        self.epoch_log = EpochLog(run_dir, self.checkpoint.path, self.start, done, log_state, total)
        self.ctrl_c = None  # guard()'s StopOnCtrlC

    def __iter__(self):
        """(epoch, step, x, n_labelled, roles, sizes) of every step that trains (run() says what
        each is). Inside guard(): a Ctrl-C asked for stops here, between steps."""
        args, train_set, device = self.args, self.train_set, self.device
        world = data.distributed()[1]
        data_on = data_placement(args, train_set.images, device)
        images = train_set.images.to(device) if data_on == "device" else train_set.images
        epoch0, step0 = self.start
        for epoch in range(epoch0, math.ceil(self.total / self.per_epoch)):  # the last may be cut
            first = step0 if epoch == epoch0 else 0  # a resumed epoch starts mid-way
            if first == 0:  # (a resumed epoch's loss keeps the steps before the stop)
                self.epoch_log.new_epoch()
            self.checkpoint.mark(epoch, first)  # where a checkpoint taken from now on restarts
            batches = self.batches_of(epoch)
            for step, batch, rows, x in batch_stream(images, batches, first, data_on, device,
                                                     args.workers):
                self.ctrl_c.check()  # a Ctrl-C stops here, between steps
                if not len(batch):  # a dataset-scope batch without a triplet: no loss
                    skip_update(self.sched)
                    self.epoch_log.progress.update(1)
                else:
                    # dropout draws from the global generator, re-seeded each step: the labelled
                    # rows (first in the batch) get the same masks with or without negatives
                    torch.manual_seed(data.derive_seed(args.seed, "step",
                                                       epoch * self.per_epoch + step))
                    n_labelled = rows.numel() if args.mining_scope == "dataset" else \
                        int((~train_set.negative_only[rows]).sum())  # labelled rows come first
                    sizes = [len(s) for s in batch.tensor_split(world)] if world > 1 else None
                    roles = (train_set.labels[batch], train_set.negative_only[batch],
                             train_set.every_anchor[batch])  # (B,) each, on the CPU
                    yield epoch, step, x, n_labelled, roles, sizes  # run() trains on it
                self.checkpoint.mark(epoch, step + 1)  # this step is done: a stop restarts after it
            self.end_epoch(epoch, len(batches))

    def batches_of(self, epoch):
        """The epoch's index batches (epoch_batches), cut where --train-steps ends the run; a
        resumed epoch of dataset-scope triplets takes those its checkpoint holds."""
        args = self.args
        batches = self.checkpoint.epoch_batches(epoch) or epoch_batches(
            args, self.train_set, epoch, self.embed() if args.mining_scope == "dataset" else None)
        return self.checkpoint.keep_batches(
            epoch, batches[:self.total - epoch * self.per_epoch], args)

    def end_epoch(self, epoch, n_batches):
        """The epoch's line in metrics.jsonl (a probe every --eval-every epochs), checkpoint.pt."""
        steps_done = epoch * self.per_epoch + n_batches  # global optimiser steps after this epoch
        due = self.args.eval_every and (epoch + 1) % self.args.eval_every == 0  # a probe ends it
        self.epoch_log.end_epoch(epoch, steps_done, self.sched.get_last_lr()[0],
                                 self.probe if due else None)
        # a full epoch restarts at the next one; a last epoch cut by --train-steps where it
        # stopped, so that a longer --train-steps goes on with the same epoch's batches
        position = (epoch + 1, 0) if n_batches == self.per_epoch else (epoch, n_batches)
        self.checkpoint.save(*position, self.checkpoint.rng_states(), self.epoch_log.state())

    @contextlib.contextmanager
    def guard(self):
        """Around the loop: the first Ctrl-C stops it at the next step (StopOnCtrlC), and a stop
        by Ctrl-C saves checkpoint.pt at the step it stopped before (Checkpoint.on_ctrl_c)."""
        with StopOnCtrlC(self.device) as self.ctrl_c, \
                self.checkpoint.on_ctrl_c(self.epoch_log, self.run_dir):
            yield
        self.epoch_log.progress.close()

    def updating(self):
        """Around the update: a second Ctrl-C now leaves the last checkpoint as it was."""
        return self.checkpoint.updating()

    def log(self, loss, sizes, epoch, step):
        """The step's loss (a device scalar, unread: reading it would wait for the device) into
        the epoch's mean, read a step later (EpochLog). Under torchrun, the whole batch's."""
        value = loss.detach().clone()  # a copy: all_reduce below works in place
        if sizes:  # the whole batch's loss from the ranks' (make_loss's scaling)
            torch.distributed.all_reduce(value)  # SUM over the ranks
            value /= len(sizes)  # / W: the mean of the ranks' scaled losses is the batch's
        self.epoch_log.step(value, epoch, step)

    def minutes(self):
        """Training minutes, continued across --resume, without the probes' time."""
        return self.epoch_log.minutes()


def check_resumable(run_dir, steps_done, total):
    """A resumed run must have steps left, or a finish left to do (probe and evaluation)."""
    finished = os.path.exists(os.path.join(run_dir, "metrics.json"))  # finish() writes it last
    if steps_done > total:
        raise data.DataError(f"--resume {run_dir}: the run has done {steps_done} optimiser steps, "
                             f"more than the {total} asked for; it cannot be shortened")
    if steps_done == total and finished:  # steps done and metrics written: nothing left to do
        raise data.DataError(f"--resume {run_dir}: the run is finished ({total} optimiser "
                             f"steps); pass a larger --epochs or --train-steps to train on")


def skip_update(sched):
    """A step without a loss: the schedule moves on, the weights do not (an optimiser step would
    still move them: AdamW's weight decay and momentum)."""
    with warnings.catch_warnings():  # torch warns when a schedule steps before any update
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        sched.step()


class Checkpoint:
    """checkpoint.pt: everything --resume needs to continue at (epoch, step) as if never
    stopped -- weights, optimiser, schedule, every random state, the epoch's log so far."""

    def __init__(self, run_dir, model, classifier, opt, sched, gens, device):
        self.path = os.path.join(run_dir, "checkpoint.pt")
        self.model, self.classifier, self.opt, self.sched = model, classifier, opt, sched
        self.gens, self.device = gens, device
        self.at, self.busy = None, False  # the step a checkpoint taken now would restart at
        self.mined = None  # (epoch, batches) of dataset-scope mining: mined once per epoch

    def epoch_batches(self, epoch):
        """The mined batches of `epoch` if a checkpoint holds them, else None: a resumed epoch
        of dataset-scope triplets uses the triplets mined at its start, not re-mined on the
        weights of the stop."""
        return self.mined[1] if self.mined and self.mined[0] == epoch else None

    def keep_batches(self, epoch, batches, args):
        """Remember an epoch's mined batches for the checkpoints taken during it."""
        self.mined = (epoch, batches) if args.mining_scope == "dataset" else None
        return batches

    def rng_states(self):
        """Every random state a step draws from."""
        states = {f"{name}_rng": getattr(self.gens, name).get_state()  # Generator states: uint8
                  for name in ("augment", "mining", "negatives")}
        states["cpu_rng"] = torch.get_rng_state()  # the global CPU generator (dropout on the CPU)
        if self.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state(self.device)  # GPU dropout draws here
        return states

    def mark(self, epoch, step):
        """The position a checkpoint taken from now on restarts at (called at an epoch's start
        and after every step), with the random states of that moment."""
        self.at = (epoch, step, self.rng_states())  # a snapshot: the streams move on next step

    @contextlib.contextmanager
    def updating(self):
        """Around the optimiser step: a second Ctrl-C now leaves the last checkpoint as it was."""
        self.busy = True
        yield
        self.busy = False

    def save(self, epoch, step, rng, log_state):
        """Atomically, by rank 0 only."""
        if data.distributed()[0] > 0:  # one writer: the ranks hold identical weights
            return
        state = {"model": self.model.state_dict(), "classifier": self.classifier.state_dict(),
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "epoch": epoch, "step": step, "log": log_state, **rng,
                 "seed_rule": SEED_RULE}  # what --resume must redraw the same streams with
        if self.mined and self.mined[0] == epoch:  # mid-epoch: the epoch's mined triplets
            state["mined"] = torch.cat(self.mined[1])  # (T, 3), cut back by mined_sizes
            # (n_batches,) lengths, to split the concatenation back
            state["mined_sizes"] = torch.tensor([len(b) for b in self.mined[1]])
        data.save_torch(self.path, state)  # atomic: a stop or a full disk keeps the old one

    def restore(self):
        """Load checkpoint.pt into the run; returns (epoch, step, log state)."""
        state = data.load_torch_file(self.path, "--resume checkpoint")  # weights_only: no pickles
        for key, module in (("model", self.model), ("classifier", self.classifier)):
            data.load_weights(module, state, key, self.path, "--resume checkpoint")
        try:
            if state.get("seed_rule") != SEED_RULE:  # older streams: not the same batches
                raise ValueError("its random streams were seeded by an older rule")
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            on = "cpu" if self.device.type == "cpu" else self.device  # a CPU generator's state
            for name in ("augment", "mining", "negatives"):
                getattr(self.gens, name).set_state(state[f"{name}_rng"].to(on))
            torch.set_rng_state(state["cpu_rng"].cpu())  # set_rng_state wants a CPU ByteTensor
            if self.device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)  # CPU ByteTensor too
            if "mined" in state:  # dataset-scope triplets of the epoch it stopped in
                sizes = state["mined_sizes"].tolist()
                # (epoch, [(t, 3) batches]) as keep_batches stored them
                self.mined = (int(state["epoch"]), list(state["mined"].split(sizes)))
            return int(state["epoch"]), int(state["step"]), state.get("log", {})
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise data.DataError(f"--resume checkpoint {self.path}: does not fit this run "
                                 f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                                 f"it was written by another version or another run") from error

    @contextlib.contextmanager
    def on_ctrl_c(self, log, run_dir):
        """A Ctrl-C between steps saves the run at the step it stopped before."""
        try:
            yield
        except KeyboardInterrupt:
            log.progress.close()  # the bar first, so that the message starts on a clean line
            if self.busy:  # weights half-updated: the old checkpoint is the consistent one
                print(f"\ninterrupted during an update: kept {self.path} as it was")
            elif self.at is not None and data.distributed()[0] == 0:  # at None: no position yet
                epoch, step, rng = self.at
                self.save(epoch, step, rng, log.state())
                print(f"\ninterrupted: saved {self.path} at epoch {epoch + 1}, step {step}. "
                      f"Continue with: python train.py --resume {run_dir}")
            raise  # run_command turns it into exit status 130


class StopOnCtrlC:
    """The first Ctrl-C asks to stop at the next step boundary (a second stops at once). Ctrl-C
    reaches every rank, not always at the same step: all stop when one asks."""

    def __init__(self, device):
        self.device, self.requested, self.previous = device, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal() needs the main thread
            self.previous = signal.signal(signal.SIGINT, self._handler)  # put back by __exit__
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving and stopping after this step (press again to stop at once)")

    def check(self):
        """Raise KeyboardInterrupt here, between steps, if any rank was asked to stop."""
        requested = self.requested
        if data.distributed()[1] > 1:
            flag = torch.tensor(float(requested), device=self.device)  # NCCL reduces CUDA tensors
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)  # 1: any rank asked
            requested = bool(flag.item())
        if requested:
            raise KeyboardInterrupt


class Diverged(data.RunError):
    """The loss became NaN or infinite; the message says where and what to try."""


class EpochLog:
    """metrics.jsonl: one line per epoch, exact across --resume (the epoch's mean loss counts
    the steps before a stop; lines after the checkpoint's epoch are dropped on resuming).

    Each step's loss is read one step late: reading a value waits for the device, and one
    step of lag lets it work through the next step meanwhile. On CUDA the copy goes into pinned
    memory behind an event, which has long passed when it is read (value.item() a step later
    would wait for everything queued since)."""

    def __init__(self, run_dir, checkpoint_path, start, done, state, total):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.checkpoint_path, self.pending = checkpoint_path, None
        # resumed mid-epoch: the losses of the steps before the stop
        self.loss_sum, self.loss_steps = state.get("loss_sum", 0.0), state.get("loss_steps", 0)
        # paused: seconds spent in probes, not counted as training
        self.minutes_before, self.t0, self.paused = state.get("minutes", 0.0), time.time(), 0.0
        self.lines = []  # the lines of finished epochs, up to the checkpoint's
        if start > (0, 0) and os.path.exists(self.path):  # tuple order: past the very start
            with open(self.path, encoding="utf-8") as f:
                # epochs are 1-based in the file: keep those before the resumed one
                self.lines = [line for line in f.read().splitlines()
                              if line.strip() and json.loads(line)["epoch"] <= start[0]]
        self.rank = data.distributed()[0]
        # counts optimiser steps, starting at those already done
        self.progress = tqdm(total=total, initial=done, desc="train", dynamic_ncols=True,
                             disable=None if self.rank == 0 else True)  # None: off when not a tty

    def minutes(self):
        """Training minutes, continued across --resume, without the probes' time."""
        return self.minutes_before + (time.time() - self.t0 - self.paused) / 60

    def state(self):
        """What a checkpoint keeps of the epoch so far."""
        self.flush()
        return {"loss_sum": self.loss_sum, "loss_steps": self.loss_steps, "minutes": self.minutes()}

    def step(self, value, epoch, step):
        """Log this step's loss (device scalar): the previous one is read now."""
        self.flush()
        if value.is_cuda:
            done = torch.cuda.Event()  # lets flush() wait for this copy alone
            value = value.to("cpu", non_blocking=True)  # valid once `done` has passed
            done.record()  # after the copy, in the current stream
            self.pending = (value, done, epoch, step)
        else:
            self.pending = (value, None, epoch, step)  # a CPU value is ready: nothing to wait for

    def flush(self):
        """Read the pending loss; stop the run on inf / nan."""
        if self.pending is None:
            return
        value, done, epoch, step = self.pending
        self.pending = None
        if done is not None:
            done.synchronize()  # long passed: returns at once
        value = value.item()  # a CPU tensor now: no device synchronisation
        if not math.isfinite(value):
            kept = (f"the last good checkpoint {self.checkpoint_path} is kept"
                    if os.path.exists(self.checkpoint_path) else "no checkpoint was written yet")
            raise Diverged(f"loss is {value} at epoch {epoch + 1}, step {step}. Stopped; {kept}. "
                           f"Try a lower --lr or a higher --temperature.")
        self.loss_sum, self.loss_steps = self.loss_sum + value, self.loss_steps + 1
        self.progress.update(1)
        self.progress.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")

    def end_epoch(self, epoch, steps_done, lr, probe=None):
        """The epoch's line: mean loss, learning rate, minutes (and a probe, untimed)."""
        self.flush()
        record = {"epoch": epoch + 1, "optimizer_steps": steps_done,  # 1-based in the file
                  # max(1, ...): an epoch resumed at its very end may have no new step
                  # None: an epoch of dataset-scope batches without a triplet had no loss
                  "loss": self.loss_sum / self.loss_steps if self.loss_steps else None, "lr": lr,
                  "minutes": self.minutes()}
        if probe is not None and self.rank == 0:
            t = time.time()  # the probe's time is taken out of "minutes"
            record["probe_accuracy"] = probe()
            self.paused += time.time() - t
            self.progress.write(f"epoch {epoch + 1}: linear probe test accuracy "
                                f"{record['probe_accuracy']:.4f} after {record['minutes']:.2f} min")
        self.lines.append(json.dumps(record))
        if self.rank == 0:
            data.write_text(self.path, "\n".join(self.lines) + "\n")  # atomic rewrite of the file

    def new_epoch(self):
        """An epoch starts: its mean loss starts from nothing. (Not at the end of the last one:
        a stop right after it restarts by closing that epoch again, with its losses.)"""
        self.loss_sum, self.loss_steps = 0.0, 0


if __name__ == "__main__":
    data.run_command(main)
