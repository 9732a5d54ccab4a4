"""
data.py -- the images a run sees and how they become contrastive batches. In the file's order:
the image set, batches with negatives, batched augmentations; then reading images exactly as an
image viewer shows them, sources and splits, the synthetic set and real negatives; and last the
plumbing every script shares (errors, manifests, atomic files, locks, figures, devices and
processes, the command line).

The image set. Every source ends up as one ImageSet: a uint8 tensor (N, C, H, W) held in memory
plus labels, a negative-only flag (near-OOD synthetic images, which the thesis's loss uses only
as negatives), a kind (real / synthetic ID / synthetic near-OOD / real negative) and the
synthetic images' strength.

Batches with negatives. contrastive_batches deals an epoch's labelled images out in groups of m
per class (every anchor has a positive) and puts negative-only images of the batch's classes (or
meant for every anchor) on top of each batch. Every random stream is seeded by derive_seed from
--seed alone, so a resumed run draws the same batches again.

Augmentations run batched on the training device with per-sample random parameters (SimCLR,
Chen et al. 2020, Appendix A), so the same code feeds a laptop CPU and a GPU.

Reading and sources. What a viewer shows is what the model gets: EXIF rotation is applied (phone
photos), 16-bit grey levels are scaled to 8 bits (not clipped), transparent pixels are shown on
white, and hidden files (.DS_Store, ._*, __MACOSX) are not images. Sources:

  digits          sklearn's bundled handwritten digits (default; no download)
  mnist | fashion-mnist | cifar10   torchvision data sets under --data-root (--download to fetch)
  PATH            a folder in ImageFolder layout: PATH/train + PATH/test, or PATH/<class>/ split
                  by a seeded, stratified --val-fraction; sub-folders of a class are read too
  --synthetic DIR images written by dafusion.py, listed in DIR/manifest.csv
  --negative-data DIR   photographs that are none of the classes: negative-only images

The plumbing: bad input is refused in one line (DataError), every file is written whole or not
at all (atomic_write), a folder is written by one process at a time (folder_lock), and under
torchrun each process knows its device and its share. This file imports no other file of the
project.

Run `python data.py --data digits` to print what a configuration loads (sizes, classes, held-out
OOD classes) and write a grid of augmented views to data_preview.png.
"""

import argparse
import collections
import contextlib
import copy
import csv
import datetime
import errno
import functools
import glob
import hashlib  # content digests: a renamed copy of a run's image is still that image
import json  # a run's config.json (read_run_settings)
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import traceback  # clear_frames: a failed writer's frames let go of its open file
from concurrent.futures import ProcessPoolExecutor  # decodes large folders (load_files)
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps  # ImageOps.exif_transpose: phone photos' rotation
from tqdm.auto import tqdm

try:  # folder locks (folder_lock); POSIX only: without it (Windows) folders are not locked
    import fcntl
except ImportError:
    fcntl = None

# matched lower-cased, so .JPG counts too
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BUILTIN = ("digits", "mnist", "fashion-mnist", "cifar10")  # --data names that are not folders
NATIVE_SIZE = {"digits": 16, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}  # digits: 8 px x 2
DEFAULT_OOD = {"digits": "8,9"}  # held-out classes of the default run (open-set OOD test)
# ImageSet.kind: where an image came from (real training image, synthetic ID / near-OOD
# variation, or a real photograph of --negative-data, used only as a negative)
KIND_REAL, KIND_ID, KIND_NEAR_OOD, KIND_NEGATIVE = 0, 1, 2, 3
KINDS = {"id": KIND_ID, "near_ood": KIND_NEAR_OOD}  # the manifest's kind column -> KIND_*
# the synthetic set's manifest, written by dafusion.py and read here: one row per image
MANIFEST_COLUMNS = ("path", "label", "kind", "source", "strength", "seed", "generator")


# -----------------------------------------------------------------------------
# The image set: images in memory with what each of them is


@dataclass
class ImageSet:
    """Images in memory with what each of them is. Per-image fields have N entries."""
    images: torch.Tensor  # (N, C, H, W) uint8, decoded once
    labels: torch.Tensor  # (N,) long in [0, len(classes)); a variation carries its source's class
    classes: list  # class names; labels index this list
    negative_only: torch.Tensor = None  # (N,) bool: never an anchor or a positive (default: False)
    kind: torch.Tensor = None  # (N,) int8 KIND_REAL / KIND_ID / KIND_NEAR_OOD (default: real)
    names: list = field(default_factory=list)  # file path or "<source>/<index>" of each image
    strength: torch.Tensor = None  # (N,) float: SDEdit strength of a synthetic image, 0 if real
    # (N,) bool: a negative-only image meant for every anchor, not only for its class's (a
    # --negative-data image outside a class sub-folder); default False
    every_anchor: torch.Tensor = None

    def __post_init__(self):
        n = len(self.images)
        if self.negative_only is None:  # a real data set: every image may be an anchor
            self.negative_only = torch.zeros(n, dtype=torch.bool)
        if self.kind is None:
            self.kind = torch.full((n,), KIND_REAL, dtype=torch.int8)
        if self.strength is None:
            self.strength = torch.zeros(n)
        if self.every_anchor is None:
            self.every_anchor = torch.zeros(n, dtype=torch.bool)
        # a mismatch here would silently pair images with the wrong labels later
        sizes = {len(self.labels), len(self.negative_only), len(self.kind), len(self.strength),
                 len(self.every_anchor)}
        if sizes != {n}:
            raise DataError(f"ImageSet: {n} images but per-image fields of sizes {sorted(sizes)}")
        # labels index classes: 0 <= y < K
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            bad = self.labels[(self.labels < 0) | (self.labels >= len(self.classes))][0].item()
            raise DataError(f"label {bad} is out of range for {len(self.classes)} classes "
                            f"{self.classes}; labels must be 0..{len(self.classes) - 1}")

    def __len__(self):
        return len(self.images)

    def subset(self, index):
        """The images at `index` (indices or a bool mask), with everything that belongs to them."""
        index = torch.as_tensor(index)  # a list, an array or a tensor
        if index.dtype == torch.bool:
            index = torch.nonzero(index).squeeze(1)  # mask -> (n,) positions
        index = index.long()  # int64: indexing would treat uint8 as a mask
        return ImageSet(self.images[index], self.labels[index], self.classes,
                        self.negative_only[index], self.kind[index],
                        [self.names[i] for i in index.tolist()] if self.names else [],
                        self.strength[index], self.every_anchor[index])

    def probe_set(self):
        """What the linear classifier trains on: the real and ID images that are labelled
        samples. Never a near-OOD image, never a negative-only one, whatever role the run gave
        them."""
        real_or_id = (self.kind == KIND_REAL) | (self.kind == KIND_ID)
        return self.subset(real_or_id & ~self.negative_only)

    def synthetic(self):
        """The synthetic images (ID and near-OOD), in any role."""
        return self.subset((self.kind == KIND_ID) | (self.kind == KIND_NEAR_OOD))

    @staticmethod
    def concat(sets):
        """One ImageSet from several (None and empty entries skipped); they share the classes."""
        sets = [s for s in sets if s is not None and len(s)]
        # cat(name): one per-image field of every set, concatenated
        cat = lambda name: torch.cat([getattr(s, name) for s in sets])  # noqa: E731
        return ImageSet(cat("images"), cat("labels"), sets[0].classes, cat("negative_only"),
                        cat("kind"), sum((s.names for s in sets), []), cat("strength"),
                        cat("every_anchor"))


# -----------------------------------------------------------------------------
# Batches: m images per class, and negative-only images on top


def contrastive_batches(labels, negative_only, batch_size, m_per_class=4, negatives_share=0.25,
                        generator=None, every_anchor=None):
    """One epoch of index batches (a list of (b,) tensors) for a contrastive loss.

    Labelled samples come in groups of m (or m+1) of one class, so that every anchor has a
    positive (a class with a single image cannot give it one). The groups are shuffled and dealt
    round-robin into ceil(labelled / batch_size) batches: every labelled sample appears once an
    epoch and the number of batches depends on the sizes alone. When negative-only samples
    exist, round(batch_size * negatives_share) of them ride on top of each batch (the labelled
    part does not shrink), drawn with replacement from those of the classes the batch holds and
    those meant for every anchor (every_anchor, (N,) bool), so that same-class hard-negative
    masking has something to contrast."""
    # a fixed default: the same batches on every call
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    real = torch.nonzero(~negative_only).squeeze(1)  # labelled samples: real and synthetic ID
    negatives = torch.nonzero(negative_only).squeeze(1)  # near-OOD samples
    groups = []  # chunks of m same-class indices
    for c in torch.unique(labels[real]).tolist():
        idx = real[labels[real] == c]  # class c's labelled indices
        # shuffled within the class and cut into chunks of m (the last one shorter)
        chunks = list(torch.split(idx[torch.randperm(len(idx), generator=g)], m_per_class))
        if len(chunks) > 1 and len(chunks[-1]) == 1:  # no lone image: it would have no positive
            chunks[-2:] = [torch.cat(chunks[-2:])]  # merged with the chunk before it: m + 1 images
        groups += chunks
    n_batches = min(len(groups), math.ceil(len(real) / batch_size))  # at most one batch per group
    order = torch.randperm(len(groups), generator=g).tolist()  # the groups shuffled across classes
    # round-robin: group order[j] goes to batch j mod n_batches
    batches = [torch.cat([groups[i] for i in order[b::n_batches]]) for b in range(n_batches)]
    n_neg = int(round(batch_size * negatives_share)) if len(negatives) else 0  # 0: no negatives
    for b, batch in enumerate(batches if n_neg else []):
        fits = torch.isin(labels[negatives], labels[batch])  # of this batch's classes
        if every_anchor is not None:
            fits |= every_anchor[negatives]  # or meant for every anchor
        pool = negatives[fits]
        pool = pool if len(pool) else negatives  # no match at all: any negative will do
        pick = pool[torch.randint(len(pool), (n_neg,), generator=g)]  # with replacement
        batches[b] = torch.cat([batch, pick])  # labelled first, then the negatives
    return batches


def count_contrastive_batches(labels, negative_only, batch_size, m_per_class=4):
    """len(contrastive_batches(...)), from the class sizes alone (no draw, no model)."""
    sizes = torch.bincount(labels[~negative_only]).tolist()  # labelled images per class
    groups = 0
    for n in filter(None, sizes):
        chunks = math.ceil(n / m_per_class)  # torch.split's chunks of m, the last one shorter
        groups += chunks - (chunks > 1 and n % m_per_class == 1)  # a lone last image joins
    return min(groups, math.ceil(sum(sizes) / batch_size))  # as contrastive_batches' n_batches


def epoch_generator(seed, epoch):
    """The random stream of an epoch's batches."""
    return torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))


def derive_seed(seed, *parts):
    """The one rule that seeds every random stream of the project from the run's --seed: 32 bits
    of sha256("seed/part/part/..."). A function of (seed, parts) alone, so a resumed run redraws
    an epoch's batches or a step's dropout without storing them, an image's noise does not
    depend on which images were made before it, and two settings of one seed draw the same
    numbers in every stream they share (e.g. derive_seed(0, "epoch", 3), derive_seed(0,
    "augment"), derive_seed(0, source, "near_ood", 1) for a synthetic image)."""
    return int(digest("/".join(str(part) for part in (seed, *parts))), 16)  # 8 hex digits


def digest(text, n=8):
    """A short, stable hash of a string: n hex digits of sha256 (Python's hash() is salted per
    process). A name that is not UTF-8 hashes as its own bytes (os.fsencode's)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


class BatchImages(torch.utils.data.Dataset):
    """train.py --data-on host: item i is the uint8 images (b, C, H, W) of this process's share
    of batch i (for (T, 3) triplet batches, the a, p, n images of each triplet in turn). Read by
    a DataLoader with batch_size=None, so one worker gathers a whole batch in one indexing."""

    def __init__(self, images, batches, rank=0, world=1):
        self.images, self.batches, self.rank, self.world = images, batches, rank, world

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        share = self.batches[i].tensor_split(self.world)[self.rank]  # this rank's rows
        return self.images[share.flatten()]  # (b, C, H, W) uint8; (3T, C, H, W) for triplets


def _ignore_ctrl_c(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers' process group too


def host_batches(images, batches, first=0, rank=0, world=1, workers=2, pin_memory=False):
    """An iterator over the uint8 images of batches[first:], gathered from host memory by
    `workers` DataLoader processes (a few batches ahead) and, for a GPU, put in pinned memory so
    that .to(device, non_blocking=True) copies while the device still works on the step before.
    The path for training sets larger than the GPU's memory; the views are made on the device."""
    # sampler=range(first, ...): a resumed epoch starts at its first undone batch
    loader = torch.utils.data.DataLoader(
        BatchImages(images, batches, rank, world), sampler=range(first, len(batches)),
        batch_size=None, num_workers=workers, pin_memory=pin_memory,  # None: an item is a batch
        worker_init_fn=_ignore_ctrl_c, prefetch_factor=4 if workers else None,  # 4 per worker
        # the workers' seeds come from this generator, not from the global one that dropout
        # uses: a run with --data-on host draws the same numbers as one without
        generator=torch.Generator().manual_seed(0))
    return iter(loader)  # the workers start here


# -----------------------------------------------------------------------------
# Batched augmentations on the training device (per-sample random parameters)


def augment(images, how, g, mean, std):
    """uint8 (B, C, H, W) on any device -> one augmented, normalised float view (B, C, H, W)."""
    x = images.float() / 255.0  # [0, 1] floats
    if not len(x):  # no image (an empty batch share): the resampling below needs one
        return x
    if how == "rotation":
        x = augment_rotation(x, g)
    elif how == "simclr":
        x = augment_simclr(x, g)
    elif how != "none":
        raise ValueError(f"--augment must be none, rotation or simclr; got {how!r}")
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # real images' mean and std


def augment_rotation(x, g, max_degrees=15.0, scale=(0.9, 1.1), shift=0.1):
    """The Siamese project's rotation augmentation: pad, rotate, scale (and a small shift)."""
    B, dev = x.shape[0], x.device
    # per-sample parameters, all (B,): angle in radians, zoom, shift in half-image units
    angle = _uniform(B, -max_degrees, max_degrees, g, dev) * torch.pi / 180  # degrees -> radians
    s = 1.0 / _uniform(B, *scale, g, dev)  # the sampling grid shrinks when the image grows
    tx, ty = _uniform(B, -shift, shift, g, dev), _uniform(B, -shift, shift, g, dev)
    theta = torch.stack([torch.stack([s * angle.cos(), -s * angle.sin(), tx], 1),
                         torch.stack([s * angle.sin(), s * angle.cos(), ty], 1)], 1)  # (B, 2, 3)
    return _affine(x, theta)  # zeros padding: the "pad" of the Siamese project


def augment_simclr(x, g, strength=0.5, crop_scale=(0.2, 1.0), flip=True):
    """SimCLR's augmentations, batched: random resized crop, horizontal flip, colour jitter
    (0.8 s brightness/contrast/saturation, 0.2 s hue, with p 0.8), grayscale (p 0.2), Gaussian
    blur (p 0.5) for images of 64 px or more. x is in [0, 1], (B, C, H, W)."""
    B, C, H, W = x.shape
    dev = x.device  # every random number is drawn on the images' device (no host round trip)
    # ---- random resized crop (area in crop_scale, aspect 3/4..4/3) + flip, one affine map
    area = _uniform(B, *crop_scale, g, dev)  # (B,) share of the image the crop covers
    log_ratio = _uniform(B, np.log(3 / 4), np.log(4 / 3), g, dev)  # (B,) log aspect ratio
    sw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sh = (area / log_ratio.exp()).sqrt().clamp(max=1.0)  # crop height / image height
    # the crop's centre, anywhere the crop still fits (normalised coordinates)
    cx, cy = (1 - sw) * _uniform(B, -1, 1, g, dev), (1 - sh) * _uniform(B, -1, 1, g, dev)
    flips = torch.rand(B, generator=g, device=dev) < 0.5  # drawn even if not flip: same stream
    sign = torch.where(flips, -1.0, 1.0) if flip else torch.ones(B, device=dev)  # -1: mirror x
    zero = torch.zeros(B, device=dev)
    # (B, 2, 3): output pixel -> input point; (sw, sh) pick the crop, sign flips it
    theta = torch.stack([torch.stack([sw * sign, zero, cx], 1),
                         torch.stack([zero, sh, cy], 1)], 1)
    x = _affine(x, theta)  # crop, resize back to H x W and flip in one resampling
    # ---- colour jitter with probability 0.8 (each factor per sample)
    jitter = (torch.rand(B, 1, 1, 1, generator=g, device=dev) < 0.8).float()  # (B, 1, 1, 1) 0 / 1
    s = 0.8 * strength  # SimCLR's 0.8 s for brightness, contrast, saturation
    brightness = 1 + jitter * _uniform(B, -s, s, g, dev).view(B, 1, 1, 1)  # 1 + U(-s, s), or 1
    contrast = 1 + jitter * _uniform(B, -s, s, g, dev).view(B, 1, 1, 1)
    x = (x * brightness).clamp(0, 1)  # brightness: every pixel scaled
    mean_grey = (x.mean(1, keepdim=True) if C == 1 else _grey(x)).mean((2, 3), keepdim=True)
    x = ((x - mean_grey) * contrast + mean_grey).clamp(0, 1)  # contrast: blend with mean grey
    if C == 3:
        saturation = 1 + jitter * _uniform(B, -s, s, g, dev).view(B, 1, 1, 1)
        x = ((x - _grey(x)) * saturation + _grey(x)).clamp(0, 1)  # blend with each pixel's grey
        # hue: rotate the chroma plane of YIQ by up to 0.2 s of a full turn
        angle = jitter.view(B) * _uniform(B, -0.2 * strength, 0.2 * strength, g, dev) * 2 * torch.pi
        keep, cos_part, sin_part = _hue_rotation_basis(dev)  # constant, made once per device
        matrix = (keep + angle.cos().view(B, 1, 1) * cos_part
                  + angle.sin().view(B, 1, 1) * sin_part)  # (B, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)  # rgb' = M_b rgb, per px
        to_grey = torch.rand(B, 1, 1, 1, generator=g, device=dev) < 0.2  # random grayscale
        x = torch.where(to_grey, _grey(x).expand_as(x), x)  # grey in all 3 channels
    # ---- Gaussian blur, p 0.5, sigma in [0.1, 2.0], kernel 10% of the side (large images only)
    if H >= 64:  # small images: SimCLR's CIFAR recipe leaves out the blur
        k = int(0.1 * H) // 2 * 2 + 1  # odd kernel size
        sigma = _uniform(B, 0.1, 2.0, g, dev)  # (B,) blur strength per image
        blur = torch.rand(B, generator=g, device=dev) < 0.5
        sigma = torch.where(blur, sigma, torch.full_like(sigma, 1e-3))  # tiny sigma: no blur
        t = torch.arange(k, device=dev, dtype=x.dtype) - k // 2  # (k,) offsets from the centre
        kernel = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, k) 1-D Gaussians
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
        y = x.reshape(1, B * C, H, W)  # each (image, channel) its own group: one conv for all
        y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"),
                     kernel[:, None, None, :], groups=B * C)  # horizontal pass
        y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"),
                     kernel[:, None, :, None], groups=B * C)  # vertical pass (separable)
        x = y.reshape(B, C, H, W)  # back to (B, C, H, W)
    return x


def _affine(images, theta):
    """Resample (B, C, H, W) through per-sample affine maps theta (B, 2, 3); zeros outside."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2) in [-1, 1]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _uniform(n, low, high, g, device):
    """(n,) samples from U(low, high) drawn with generator g on device."""
    return torch.rand(n, generator=g, device=device) * (high - low) + low  # U[low, high)


@functools.lru_cache(maxsize=None)
def _hue_rotation_basis(device):
    """Hue rotation by angle a in RGB = T^-1 R(a) T, T = RGB -> YIQ, R(a) rotating the (I, Q)
    plane, = keep + cos a * cos_part + sin a * sin_part with three constant (3, 3) matrices.
    Made once per device: no host-device copy (a synchronisation) in every training step."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],  # NTSC's RGB -> YIQ
                           [0.211, -0.523, 0.312]], dtype=torch.float64)  # fp64 for the inverse
    # keep = diag(1, 0, 0); cos part = diag(0, 1, 1); sin part: (I, Q) -> (-Q, I)
    parts = [torch.diag(torch.tensor([1.0, 0, 0], dtype=torch.float64)),
             torch.diag(torch.tensor([0, 1.0, 1.0], dtype=torch.float64)),
             torch.tensor([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], dtype=torch.float64)]
    return tuple((torch.linalg.inv(to_yiq) @ r @ to_yiq).float().to(device) for r in parts)


def _grey(x):
    """(B, 1, H, W) luminance of (B, 3, H, W) RGB (ITU-R 601 weights, as torchvision's)."""
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def to_float(images, mean, std):
    """uint8 (B, C, H, W) -> float, normalised with the real training images' statistics."""
    # (x / 255 - mean) / std, per channel
    return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def channel_stats(images):
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float() / 255.0  # (N, C, H, W) in [0, 1], a float copy of the set
    return x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp(min=1e-3)  # clamp: a constant channel


# -----------------------------------------------------------------------------
# Reading one image as a viewer shows it

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes for 16/32-bit grey


def as_viewed(image):
    """A PIL image as an image viewer shows it, in mode L or RGB.

    - EXIF orientation applied: phones store pictures sideways with a rotation tag;
    - 16-bit grey (industrial cameras, PNG) scaled to 8 bits, 65535 -> 255: Pillow's
      convert("L") would clip every value above 255 and leave a black-and-white silhouette.
      Mode I (32-bit integers) is read as 16-bit data, values above 65535 clipped; mode F
      (floats) as 0..1 when it stays within [0, 1], else as 0..255 grey levels;
    - transparent pixels composited on white (convert("RGB") drops alpha and shows whatever
      colour the invisible pixels happen to store).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT or image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)  # (H, W) the stored values
        if image.mode in SIXTEEN_BIT:
            grey = grey / 257.0  # 65535 / 257 = 255: the full 16-bit range to the full 8-bit one
        elif grey.size and grey.max() <= 1.0:  # mode F within [0, 1]: scaled to 0..255
            grey = grey * 255.0
        # round, then clip: mode I above 65535 and mode F outside 0..255 saturate
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    # modes with alpha, or an image (P, L, RGB) with one transparent colour
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # a over white, as a viewer shows
    if image.mode not in ("L", "RGB"):
        return image.convert("L" if image.mode in ("1", "L") else "RGB")  # P, CMYK, YCbCr, ...
    return image


def resize_pil(image, size, mode="crop"):
    """PIL image -> size x size. mode "crop": scale the short side, centre-crop; "letterbox":
    scale to fit and paste centred on a black canvas (keeps the aspect ratio; the fruit project)."""
    w, h = image.size
    if mode == "letterbox":
        scale = size / max(w, h)  # the long side becomes `size`
        # max(1, .): a very thin image keeps one pixel
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        canvas = Image.new(image.mode, (size, size))  # black, same mode (L or RGB)
        canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2))
        return canvas
    scale = size / min(w, h)  # the short side becomes `size`, the long one is cropped
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.BICUBIC)  # max(size, .): rounding never leaves a side short
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2  # the centred square
    return image.crop((left, top, left + size, top + size))


def crop_to_mask(image, mask, dilation=0.1):
    """The thesis's preprocessing: a square crop around the object mask, its box dilated by
    `dilation` of its size on every side. Returns (the image cropped, the mask cropped the same
    way, both at the image's scale): inpainting repaints inside exactly the crop's mask."""
    mask = mask.convert("L").resize(image.size)  # the mask on the image's pixel grid
    box = np.argwhere(np.asarray(mask) > 127)  # (P, 2) (row, col) of the object's pixels
    if len(box) == 0:  # an empty mask: the whole image, uncropped
        return image, mask
    (top, left), (bottom, right) = box.min(0), box.max(0) + 1  # the object's bounding box
    side = max(bottom - top, right - left) * (1 + 2 * dilation)  # longer side, dilated at both ends
    cy, cx = (top + bottom) / 2, (left + right) / 2  # the box's centre (row, col)
    square = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2),
              round(cy + side / 2))  # may reach outside the image: PIL pads with black
    return image.crop(square), mask.crop(square)


def synthetic_margin_crop(image, rng, low=0.2, high=0.3):
    """Square synthetic images get a random 20-30% cut off top and bottom (split evenly), so
    that after letterboxing they carry black margins like the real photos (the fruit project)."""
    w, h = image.size
    if w != h:  # not square: photo-like already, left as it is
        return image
    cut = round(h * rng.uniform(low, high) / 2)  # pixels off the top and off the bottom each
    return image.crop((0, cut, w, h - cut))


def read_pil(path):
    """Decode one file completely as a viewer shows it; DataError naming the file otherwise."""
    try:
        with Image.open(path) as image:  # lazy: reads the header only
            image.load()  # decode now: a truncated file fails here, not in the middle of training
            return as_viewed(image)
    except Exception as error:  # any decoder failure: OSError, ValueError, SyntaxError, ...
        raise DataError(f"{path}: cannot read this image ({error})") from error


def open_image(path, channels, size, resize="crop", mask_path=None, margin_rng=None):
    """One image file as a (C, size, size) uint8 tensor, cropped to its mask if one is given."""
    image = read_pil(path).convert("L" if channels == 1 else "RGB")  # colour -> L: ITU-R 601 luma
    if mask_path is not None:
        image = crop_to_mask(image, read_mask(mask_path, path))[0]  # [0]: the image (not the mask)
    if margin_rng is not None:
        image = synthetic_margin_crop(image, margin_rng)  # only synthetic images get a margin_rng
    array = np.asarray(resize_pil(image, size, resize), dtype=np.uint8)  # (size, size[, 3])
    # copy(): the array np.asarray makes of a PIL image is read-only (torch would warn)
    return torch.from_numpy(array.reshape(size, size, channels).copy()).permute(2, 0, 1)


def read_mask(mask_path, image_path):
    """The object mask of an image (white = object), or one line saying where it should be."""
    if not os.path.exists(mask_path):
        raise DataError(f"{mask_path}: no mask for {image_path}. --masks DIR needs one mask per "
                        f"image at DIR/<path relative to --data, extension .png>.")
    return read_pil(mask_path)


def open_masked(path, mask_path, size, resize="crop"):
    """An RGB image and its mask (L), cropped to the mask as open_image crops and resized the
    same way: the pair Stable Diffusion's inpainting gets, aligned pixel for pixel."""
    image, mask = crop_to_mask(read_pil(path).convert("RGB"), read_mask(mask_path, path))
    return resize_pil(image, size, resize), resize_pil(mask, size, resize)


def mask_path(masks_dir, image_path, root):
    """The one mask layout: the mask of ROOT/<rel>/<name>.<ext> is MASKS/<rel>/<name>.png."""
    relative = os.path.splitext(os.path.relpath(image_path, root))[0]  # e.g. apple/img_01
    return os.path.join(masks_dir, relative + ".png")  # masks are PNG whatever the image's format


def visible(name):
    """False for what file managers hide: .DS_Store, ._* (macOS), .git, __MACOSX (zip files)."""
    return not name.startswith(".") and name != "__MACOSX"


def list_class_folders(root):
    """ImageFolder layout: root/<class>/<images, also in sub-folders>. Returns (class names,
    [(path, class index)]), both sorted so that class ids do not depend on the file system."""
    classes = sorted(d for d in os.listdir(root) if visible(d)
                     and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class folders. Expected ImageFolder layout: "
                        f"{root}/<class name>/<image files>.")
    items, other = [], collections.Counter()  # (path, class index); skipped extensions
    for index, name in enumerate(classes):
        found = image_files(os.path.join(root, name), other)  # sub-folders included
        if not found:
            raise DataError(f"{os.path.join(root, name)}: class folder has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder.")
        items += [(path, index) for path in found]
    say_left_out(root, other)
    return classes, items


def image_files(folder, other):
    """Every image file under `folder`, sub-folders included, sorted (the same order on any file
    system); what file managers hide is passed over, other files are counted in `other` (a
    Counter, by extension) so that a folder of .heic photos is never left out without a word."""
    found = []
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = [d for d in subfolders if visible(d)]  # prune hidden folders
        for f in filter(visible, files):
            if f.lower().endswith(IMAGE_EXTENSIONS):  # .JPG as .jpg
                found.append(os.path.join(parent, f))
            else:
                other[os.path.splitext(f)[1].lower() or f] += 1  # by extension, or by name
    return sorted(found)


def say_left_out(root, other):
    """One line for the files image_files passed over, if any."""
    if other:
        print(f"{root}: left out {sum(other.values())} file(s) that are not images of a known "
              f"type ({', '.join(f'{k}: {v}' for k, v in sorted(other.items()))})")


def guess_channels(paths):
    """1 if every image (of the first 50) is greyscale, else 3."""
    for path in paths[:50]:  # 50: enough to tell, cheap on a large set
        try:
            with Image.open(path) as image:
                if image.mode not in ("L", "1", "LA", "F") + SIXTEEN_BIT:  # grey modes, 16-bit too
                    return 3
        except Exception:
            continue  # open_image reports unreadable files properly
    return 1


def _read_image(job):
    """open_image for load_files' workers: a (C, size, size) uint8 array, or the DataError."""
    path, channels, size, resize, mask = job  # one picklable tuple per image
    try:
        # numpy: pickled by value; tensors would go through torch's shared-memory handles
        return open_image(path, channels, size, resize, mask).numpy()
    except DataError as error:
        return error  # returned, not raised: --skip-bad-images decides what happens


def load_files(items, classes, channels, size, resize, skip_bad, masks_dir=None, root=None):
    """[(path, label)] -> ImageSet; with skip_bad, unreadable files are dropped and counted."""
    jobs = [(path, channels, size, resize, mask_path(masks_dir, path, root) if masks_dir else None)
            for path, _ in items]
    workers = min(16, os.cpu_count() or 1)
    if len(jobs) >= 5000 and workers > 1:  # 5000: below it, processes cost more
        # decoding small JPEGs is mostly Python work in PIL, which threads cannot share (the
        # GIL): processes. "spawn": they start clean, whatever threads or CUDA this one holds
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            # chunks of 256 images per task: one pickle round trip each, not one per image
            decoded = list(tqdm(pool.map(_read_image, jobs, chunksize=256), total=len(jobs),
                                desc=f"reading {root}", leave=False, disable=None))
    else:
        decoded = [_read_image(job) for job in jobs]  # small sets: no process start-up cost
    images, labels, names, bad = [], [], [], []
    for (path, label), image in zip(items, decoded):  # pool.map keeps the order of jobs
        if isinstance(image, DataError):  # returned by _read_image, not raised
            if not skip_bad:
                raise DataError(f"{image} Replace or delete the file, or pass "
                                f"--skip-bad-images to leave unreadable files out.")
            bad.append(path)
            continue
        images.append(torch.from_numpy(image))  # (C, size, size) uint8, no copy
        labels.append(label)
        names.append(path)
    if bad:
        print(f"--skip-bad-images: left out {len(bad)} unreadable file(s), e.g. {bad[0]}")
    if not images:
        raise DataError(f"no readable images under {root}")
    # images (N, C, size, size) uint8, labels (N,)
    return ImageSet(torch.stack(images), torch.tensor(labels), classes, names=names)


# -----------------------------------------------------------------------------
# Sources and splits


def stratified_split(labels, fraction, seed):
    """Indices (keep, held) with `fraction` of every class held out, seeded."""
    g = torch.Generator().manual_seed(seed)  # a private stream: the global one is left alone
    keep, held = [], []
    for c in torch.unique(labels).tolist():  # sorted class ids: the same draws on every run
        idx = torch.nonzero(labels == c).squeeze(1)  # (n_c,) positions of class c
        idx = idx[torch.randperm(len(idx), generator=g)]  # a seeded shuffle within the class
        n_held = int(round(len(idx) * fraction))  # the same share of every class
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values  # original order


def load_digits(val_fraction, seed, size):
    """sklearn's 8x8 digits, upscaled to `size` px; a seeded, stratified train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits  # this function has the name
    digits = sklearn_digits()  # 1,797 8x8 images shipped inside scikit-learn, values 0..16
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    # bilinear 8 -> size px (16 by default, NATIVE_SIZE), in [0, 1] floats
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # uint8 like every other source
    labels = torch.tensor(digits.target)  # (1797,) 0..9
    full = ImageSet(images, labels, [str(i) for i in range(10)],
                    names=[f"digits/{i:04d}" for i in range(len(labels))])  # manifest source ids
    train_idx, test_idx = stratified_split(labels, val_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


def load_torchvision(name, root, download, size):
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision's files under `root`."""
    import torchvision  # imported here: only these sources need it
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=download)  # no files: RuntimeError, caught below
        except RuntimeError as error:
            raise DataError(f"--data {name}: not found under --data-root {root} ({error}). "
                            f"Either pass --download to fetch it, or point --data-root at a "
                            f"folder that holds it.") from error
        x = torch.as_tensor(np.asarray(ds.data))  # (N, H, W) grey or (N, H, W, 3) colour
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        if x.shape[-1] != size:  # resized once here, not per batch
            # antialias: no aliasing when shrinking (CIFAR to 16 px, say)
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)  # back to uint8, like every source
        part = "train" if train else "test"
        splits.append(ImageSet(x, torch.as_tensor(np.asarray(ds.targets)), list(ds.classes),
                               names=[f"{name}/{part}/{i}" for i in range(len(x))]))
    return splits


def load_folder(path, val_fraction, seed, size, resize, skip_bad, masks_dir):
    """An ImageFolder-layout folder: PATH/train + PATH/test, or PATH/<class>/ split here."""
    if not os.path.isdir(path):
        raise DataError(f"--data {path}: not a folder and not one of {', '.join(BUILTIN)}.")
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(train_dir) != os.path.isdir(test_dir):
        # "train" and "val" would otherwise become two classes of a single-folder data set
        raise DataError(f"--data {path}: has {'train/' if os.path.isdir(train_dir) else 'test/'} "
                        f"but not the other. Use PATH/train + PATH/test (rename val/ to test/), "
                        f"or one folder of class folders.")
    if os.path.isdir(train_dir):
        classes, train_items = list_class_folders(train_dir)
        test_classes, test_items = list_class_folders(test_dir)
        if test_classes != classes:  # class ids must mean the same in both splits
            raise DataError(f"{test_dir}: its class folders {test_classes} differ from "
                            f"{train_dir}'s {classes}; both splits need the same classes.")
        channels = guess_channels([p for p, _ in train_items])  # one count for both splits
        return (load_files(train_items, classes, channels, size, resize, skip_bad, masks_dir, path),
                load_files(test_items, classes, channels, size, resize, skip_bad, masks_dir, path))
    classes, items = list_class_folders(path)
    channels = guess_channels([p for p, _ in items])  # 1 for greyscale sets, else 3
    full = load_files(items, classes, channels, size, resize, skip_bad, masks_dir, path)
    # --val-fraction of each class becomes the test split
    train_idx, test_idx = stratified_split(full.labels, val_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


def parse_class_list(text, classes, what="--ood-classes"):
    """'a,b' (names or indices) -> sorted list of class indices."""
    chosen = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:  # blanks ignored: "a, b," works
        if item in classes:  # a name first: a class may be named "3"
            chosen.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):  # else an index into the sorted classes
            chosen.append(int(item))
        else:
            raise DataError(f"{what}: {item!r} is not a class; the classes are {classes}")
    return sorted(set(chosen))  # duplicates dropped


def few_shot_indices(labels, k, seed):
    """K examples per class, seeded (the caller has checked that every class has K)."""
    g = torch.Generator().manual_seed(seed)  # its own stream: the same K whatever else is drawn
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).squeeze(1)
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])  # first k of a seeded shuffle
    return torch.cat(chosen).sort().values  # the original order kept


@dataclass
class Splits:
    """What a run trains and tests on. Labels are renumbered 0..K-1 over the training classes;
    ood_test holds the test images of the held-out classes, its labels indexing ood_classes."""
    train: ImageSet  # the training images of the K training classes (few-shot subset if asked)
    test: ImageSet  # the test images of the same K classes
    ood_test: ImageSet  # the test images of the held-out classes (None without --ood-classes)
    classes: list  # the K training class names, in label order
    ood_classes: list  # the held-out class names
    root: str = None  # the --data folder (None for a built-in set): manifests name sources by it

    def source_id(self, name):
        """How a manifest names a source image: relative to the --data folder, so that
        `--data parts` and `--data ./parts` agree; a built-in set's own name otherwise."""
        # "/" on Windows too: manifests travel between systems
        return os.path.relpath(name, self.root).replace(os.sep, "/") if self.root else name


def remap(s, keep_classes):
    """Keep only images of keep_classes and renumber their labels 0..len(keep_classes)-1."""
    lookup = torch.full((len(s.classes),), -1, dtype=torch.long)  # old id -> new id, -1: dropped
    # kept class keep_classes[j] -> new id j
    lookup[torch.tensor(keep_classes, dtype=torch.long)] = torch.arange(len(keep_classes))
    sub = s.subset(lookup[s.labels] >= 0)  # images of dropped classes leave
    return ImageSet(sub.images, lookup[sub.labels], [s.classes[c] for c in keep_classes],
                    sub.negative_only, sub.kind, sub.names, sub.strength, sub.every_anchor)


def load_data(data="digits", data_root="./.data", download=False, image_size=None,
              val_fraction=0.25, seed=0, examples_per_class=None, ood_classes=None,
              resize="crop", skip_bad_images=False, masks=None):
    """Load a source and make the splits: few-shot training subset, test set, held-out OOD test."""
    if masks and data in BUILTIN:
        raise DataError("--masks works with image folders (--data PATH) only")
    size = image_size or NATIVE_SIZE.get(data, 32)  # pixels per side for every image
    if data == "digits":
        train, test = load_digits(val_fraction, seed, size)
    elif data in BUILTIN:
        train, test = load_torchvision(data, data_root, download, size)
    else:
        train, test = load_folder(data, val_fraction, seed, size, resize, skip_bad_images, masks)
    given = ood_classes is not None  # a message may blame --ood-classes only if the user gave it
    # the source's default (digits: 8, 9) unless --ood-classes is given
    held = parse_class_list(ood_classes if given else DEFAULT_OOD.get(data, ""), train.classes)
    kept = [c for c in range(len(train.classes)) if c not in held]  # the classes trained on
    if len(kept) < 2:
        raise DataError(f"--ood-classes {ood_classes} leaves {len(kept)} training class(es); "
                        f"at least 2 are needed" if given else
                        f"--data {data}: holds {len(train.classes)} class(es) {train.classes}; "
                        f"training needs at least 2")
    ood_test = remap(test, held) if held else None  # labels index the held-out classes
    names = train.classes  # the full class list, for the held-out names below
    train, test = remap(train, kept), remap(test, kept)  # labels renumbered 0..K-1
    if examples_per_class:
        counts = torch.bincount(train.labels, minlength=len(kept))  # (K,) training images per class
        if int(counts.min()) < examples_per_class:
            smallest = int(counts.argmin())
            raise DataError(f"--examples-per-class {examples_per_class}: class "
                            f"{train.classes[smallest]!r} has only {int(counts.min())} training "
                            f"images; use at most {int(counts.min())}")
        train = train.subset(few_shot_indices(train.labels, examples_per_class, seed))
    return Splits(train, test, ood_test, train.classes, [names[c] for c in held],
                  None if data in BUILTIN else data)  # root: None for built-in sets


# -----------------------------------------------------------------------------
# The set a run trains on, and the synthetic images written by dafusion.py


def training_set(args, splits):
    """(the images a run trains on, the outliers of --outlier-exposure or None): the real
    training images (unless --no-real), the synthetic images of args.synthetic in the roles the
    flags give (synthetic_roles), and the real photographs of --negative-data as negative-only
    samples (read_negative_data). The outliers are the --negative-data images when given, else
    the synthetic set's near-OOD images, whatever role those have."""
    labelled = negatives = near_ood = real_negatives = None
    if args.synthetic:
        labelled, negatives, near_ood = synthetic_roles(args, splits)
    if args.negative_data:
        real_negatives = read_negative_data(args.negative_data, splits, args.resize,
                                            args.skip_bad_images)
    # ImageSet.concat skips the None parts; labelled images come before negative-only ones
    used = ImageSet.concat([None if args.no_real else splits.train, labelled, negatives,
                            real_negatives])
    return used, real_negatives if real_negatives is not None else near_ood


def synthetic_roles(args, splits):
    """The synthetic set's images in their roles: (labelled, negative-only, the near-OOD ones),
    each an ImageSet or None:
      --positives id | id+near_ood   labelled samples (extra positives of their class)
      --negatives near_ood | id      negative-only samples (id: the placebo of the sweep)
      --near-ood-strength S          of a set with several near-OOD strengths, only strength S."""
    _, C, H, _ = splits.train.images.shape  # synthetic images are read at the real images' size
    # every synthetic image; their roles are decided below
    syn = read_manifest(args.synthetic, splits, H, C, args.resize, args.synthetic_margin,
                        args.seed, args.drop_leaking_synthetic)
    near = syn.kind == KIND_NEAR_OOD  # (N_syn,) bool
    if args.near_ood_strength is not None:
        present = sorted({round(float(s), 4) for s in syn.strength[near]})  # for the message below
        keep = ~near | ((syn.strength - args.near_ood_strength).abs() < 1e-6)  # 1e-6: %g round trip
        if not (keep & near).any():
            raise DataError(f"--near-ood-strength {args.near_ood_strength}: {args.synthetic} has "
                            f"near-OOD images of strength {present} only")
        syn = syn.subset(keep)
        near = syn.kind == KIND_NEAR_OOD  # recomputed for the smaller set
    labelled = negatives = None  # the synthetic images used as positives / as negatives only
    if args.positives != "none":
        labelled = syn.subset(~near if args.positives == "id" else torch.ones_like(near))
        labelled.negative_only = torch.zeros(len(labelled), dtype=torch.bool)  # even near-OOD ones
    if args.negatives != "none":
        negatives = syn.subset(near if args.negatives == "near_ood" else ~near)  # id: the placebo
        negatives.negative_only = torch.ones(len(negatives), dtype=torch.bool)  # never an anchor
    for flag, part in (("--positives", labelled), ("--negatives", negatives)):
        if part is not None and not len(part):
            raise DataError(f"{flag}: {args.synthetic} holds no images of that kind")
    return labelled, negatives, syn.subset(near)


def read_manifest(folder, splits, image_size, channels, resize="crop", margin=False, seed=0,
                  drop_leaking=False):
    """DIR/manifest.csv -> ImageSet of synthetic images (kind, strength and source class of each).

    Every row's source must be one of this run's training images (or empty: txt2img images have
    none): a set made with another --seed, --val-fraction or --examples-per-class holds variations
    of test images, and training on them would leak the test set. Such rows are refused, or left
    out (and counted) with drop_leaking."""
    manifest = os.path.join(folder, "manifest.csv")
    require_manifest(folder, "--synthetic")
    rows = manifest_rows(folder)  # (line, row) of every manifest row
    if not rows:
        raise DataError(f"{manifest}: no rows")
    rows = _keep_training_sources(rows, splits, manifest, drop_leaking)  # checked before any decode
    rng = np.random.default_rng(seed)  # the random margin crops (--synthetic-margin), repeatable
    images, labels, kinds, strengths, names = [], [], [], [], []
    for line, row in rows:
        where = f"{manifest}, line {line}"  # e.g. "DIR/manifest.csv, line 7" in every message
        if row["label"] not in splits.classes:  # classes are matched by name, not by id
            raise DataError(f"{where}: class {row['label']!r} is not a class of the real training "
                            f"data {splits.classes}. Regenerate the synthetic set for this data, "
                            f"or delete the rows of that class.")
        if row["kind"] not in KINDS:
            raise DataError(f"{where}: kind {row['kind']!r} must be 'id' or 'near_ood'")
        try:  # txt2img rows have no strength: 1.0, the whole diffusion
            strength = float(row["strength"]) if row["strength"].strip() else 1.0
        except ValueError:
            strength = math.nan  # refused just below: nan fails the range check
        if not 0 < strength <= 1:
            raise DataError(f"{where}: strength {row['strength']!r} must be a number in (0, 1]")
        path = os.path.join(folder, row["path"])  # manifest paths are relative to DIR
        if not os.path.exists(path):
            raise DataError(f"{where}: {path} does not exist. Re-run dafusion.py on {folder} to "
                            f"regenerate missing images (it resumes).")
        try:
            images.append(open_image(path, channels, image_size, resize,  # at the real images' size
                                     margin_rng=rng if margin else None))
        except DataError as error:
            raise DataError(f"{error} ({where}). Delete the file and re-run dafusion.py on "
                            f"{folder}: it makes missing images again.") from error
        labels.append(splits.classes.index(row["label"]))  # the source's class, this run's id
        kinds.append(KINDS[row["kind"]])
        strengths.append(strength)
        names.append(path)
    kind = torch.tensor(kinds, dtype=torch.int8)  # (N,) int8 KIND_*
    return ImageSet(torch.stack(images), torch.tensor(labels), list(splits.classes),
                    # negative_only: the near-OOD ones, until training_set assigns the roles
                    kind == KIND_NEAR_OOD, kind, names, torch.tensor(strengths))


def _keep_training_sources(rows, splits, manifest, drop):
    """The manifest rows whose source is one of this run's training images (or has no source);
    the others are refused with one line that counts where they come from, or dropped."""
    # a source as today's manifests name it, or as older ones did (the path as it was loaded)
    ids = lambda s: ({splits.source_id(n) for n in s.names} | set(s.names)  # noqa: E731
                     if s is not None else set())
    train, test, ood = ids(splits.train), ids(splits.test), ids(splits.ood_test)  # source-id sets
    foreign = collections.Counter()  # where the rows from outside the training split come from
    kept = []
    for line, row in rows:
        source = row["source"].strip()  # "" for txt2img rows: they have no source
        if source and os.path.isabs(source) and splits.root:  # an older manifest: a full path
            source = splits.source_id(source)
        if not source or source in train:
            kept.append((line, row))
        else:
            # counted by where the source lives
            foreign["this run's test images" if source in test else "held-out OOD images"
                    if source in ood else "images outside this run's training split"] += 1
    if foreign and not drop:
        counts = ", ".join(f"{n} from {where}" for where, n in foreign.most_common())
        raise LeakError(f"{manifest}: {sum(foreign.values())} of {len(rows)} rows vary images "
                        f"this run does not train on ({counts}); training on them would leak "
                        f"them. Generate the set with this run's --data, --seed, --val-fraction, "
                        f"--examples-per-class and --ood-classes, or pass --drop-leaking-synthetic "
                        f"to leave those rows out.")
    if foreign:
        print(f"--drop-leaking-synthetic: left out {sum(foreign.values())} of {len(rows)} rows "
              f"of {manifest} ({', '.join(f'{n} {w}' for w, n in foreign.most_common())})")
        if not kept:
            raise DataError(f"{manifest}: no row is left after --drop-leaking-synthetic")
    return kept


# -----------------------------------------------------------------------------
# Real negatives: photographs that are none of the classes (--negative-data)


def read_negative_data(folder, splits, resize="crop", skip_bad=False):
    """--negative-data FOLDER -> ImageSet of negative-only images (KIND_NEGATIVE), read as every
    other input is (as viewed, at the run's size and channels; hidden files left out).

    Images under FOLDER/<training class>/ are negatives of that class's anchors only (like the
    thesis's same-class masking); every other image (FOLDER itself, or sub-folders not named
    like a training class) is a negative of every anchor. Refused in one line: a missing or
    empty folder, and a folder holding any image of this run's training, test or OOD test sets,
    compared by content (decoded pixels), so that a renamed copy is caught too."""
    if not os.path.isdir(folder):
        raise DataError(f"--negative-data {folder}: no such folder")
    _, C, H, _ = splits.train.images.shape
    other = collections.Counter()
    items = []  # (path, class index or -1 for every anchor)
    for path in image_files(folder, other):
        top = os.path.relpath(path, folder).replace(os.sep, "/").split("/")[0]  # its sub-folder
        items.append((path, splits.classes.index(top) if top in splits.classes else -1))
    say_left_out(folder, other)
    if not items:
        raise DataError(f"--negative-data {folder}: no images there "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    # labels must index a class: an every-anchor image carries 0, which nothing reads
    read = load_files([(p, max(label, 0)) for p, label in items], list(splits.classes), C, H,
                      resize, skip_bad, root=folder)
    kept = set(read.names)  # --skip-bad-images may have left some out
    every = torch.tensor([label < 0 for p, label in items if p in kept], dtype=torch.bool)
    _refuse_known_images(read, splits, folder)
    return ImageSet(read.images, read.labels, read.classes, torch.ones(len(read), dtype=torch.bool),
                    torch.full((len(read),), KIND_NEGATIVE, dtype=torch.int8), read.names,
                    every_anchor=every)


def _refuse_known_images(negatives, splits, folder):
    """DataError if a negative image is, pixel for pixel, one of the run's own images."""
    digest = lambda image: hashlib.sha256(image.contiguous().numpy().tobytes()).digest()  # noqa
    known = {}  # digest -> (which set, its name)
    for where, part in (("training", splits.train), ("test", splits.test),
                        ("OOD test", splits.ood_test)):
        for i, image in enumerate(part.images if part is not None else []):
            known.setdefault(digest(image), (where, part.names[i] if part.names else f"#{i}"))
    found = [(name, known[digest(image)]) for image, name in zip(negatives.images, negatives.names)
             if digest(image) in known]
    if found:
        name, (where, theirs) = found[0]
        raise DataError(f"--negative-data {folder}: {len(found)} of its images are images of this "
                        f"run's {where} set (e.g. {name} is {theirs}); negatives must be other "
                        f"images: remove those")


# -----------------------------------------------------------------------------
# Plumbing every script shares, from here on -- errors: one line, never a traceback


class DataError(ValueError):
    """Bad input: the message names the file or argument and says what to do. Every script turns
    it into one line on stderr (run_command), never a traceback."""


class LeakError(DataError):
    """A synthetic set with variations of images the run does not train on (test images)."""


class RunError(RuntimeError):
    """A run that cannot go on (its loss diverged): one line on stderr, like DataError."""


class OtherRankFailed(Exception):
    """Under torchrun: rank 0 failed and says why (it could not claim the run folder, say) and
    this rank ends too, with exit status 1 and no message of its own (run_command)."""


# -----------------------------------------------------------------------------
# Manifests: the synthetic set's manifest.csv, its one reader and its one writer


def manifest_rows(folder):
    """FOLDER/manifest.csv as [(line number, row dict)] (line 1 is the header, so numbers match
    an editor's); [] if there is none. The one reader of the file (dafusion.py's resume reads it
    too). Names that are not UTF-8 come back as the bytes they were written from."""
    manifest = os.path.join(folder, "manifest.csv")
    if not os.path.exists(manifest):
        return []
    # -sig: a spreadsheet's BOM; newline="" as csv requires
    with open(manifest, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        # the header must name every column; extra ones are ignored
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest}: missing column(s) {missing}; needs "
                            f"{list(MANIFEST_COLUMNS)}")
        return list(enumerate(reader, start=2))


def write_manifest(folder, rows):
    """FOLDER/manifest.csv holding `rows` (dicts of MANIFEST_COLUMNS), atomically; the one
    writer of the file, the counterpart of manifest_rows."""
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(os.path.join(folder, "manifest.csv"), write)


def require_manifest(folder, option):
    """A synthetic set's folder must hold manifest.csv (made by dafusion.py)."""
    if not os.path.isfile(os.path.join(folder, "manifest.csv")):
        raise DataError(f"{option} {folder}: no manifest.csv there; make the set with `python "
                        f"dafusion.py --out {folder}` (with this run's data options)")


# -----------------------------------------------------------------------------
# Files: written whole or not at all, read safely


def atomic_write(path, write, size=None):
    """write(tmp) fills a temporary file or folder beside `path`, which is then renamed into
    place: a crash or Ctrl-C never leaves half a file where a reader (or --resume) looks. The
    one writer of every file and folder the project makes. tmp keeps path's extension, so
    writers that infer the format from the name (PIL, matplotlib) still do, and holds the
    process id, so two processes writing one path never share a temporary. On any failure the
    temporary is removed and the old `path` stays as it was; a full disk (disk_full: whatever
    library raised the error) becomes DiskFull, with about how much the file needs (`size`,
    bytes, if the caller knows)."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{os.getpid()}{ext}"  # e.g. model.tmp4242.pt
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isdir(tmp):  # left by a crash of this process id in the middle of a folder
            shutil.rmtree(tmp)
        write(tmp)  # may write a file or fill a folder
    except BaseException as error:  # Ctrl-C included: no temporary outlives its write
        written = _size_of(tmp)
        # asked while the temporary still holds its share of the disk: removed, it frees it
        full = isinstance(error, Exception) and disk_full(error, path, (size or 0) - written)
        if full:  # torch's C++ writer keeps its file open from the failed call's frames (in the
            for e in _chain(error):  # traceback): the removed temporary would hold its space
                traceback.clear_frames(e.__traceback__)  # until the error is gone
        _remove(tmp)
        if full:
            where = os.path.dirname(os.path.abspath(path))
            raise DiskFull(path, max(size or 0, written, _size_of(path)),
                           shutil.disk_usage(where).free if os.path.isdir(where) else 0) from error
        raise
    if os.path.isdir(tmp) and os.path.isdir(path):  # a folder cannot replace a folder: the old
        old = f"{stem}.old{os.getpid()}{ext}"  # one steps aside, and is removed once replaced
        os.replace(path, old)
        os.replace(tmp, path)  # the gap between these two renames is the one non-atomic moment
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)  # atomic on POSIX and Windows: the old file or the new, never half


def disk_full(error, path=None, missing=0):
    """True if the write of `path` that raised `error` failed because the disk is full. Either
    the error says so, itself or anywhere in its chain: ENOSPC (or a quota, EDQUOT) from Python,
    or the same in words (safetensors: "No space left on device (os error 28)"); torch's zip
    writer raises "unexpected pos" while handling Python's ENOSPC. Or, for a library that loses
    the errno (torch's C++ writer, given a file name: "unexpected pos" alone), the file system
    says so: where `path` goes, it has almost no room left (disk_almost_full), or less than the
    `missing` bytes the file still lacks. An error on a disk with room is never a full disk: an
    ordinary bug keeps its own traceback."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(e) for words in ("No space left on device", "os error 28",
                                              "Disk quota exceeded", "os error 122")):
            return True
    return path is not None and disk_almost_full(path, missing)


class DiskFull(DataError):
    """A write failed because the disk is full (ENOSPC): what, where, about how much it needs, and
    what to do once space is freed (`then`, which a script may replace with its own advice)."""

    def __init__(self, path, needed, free, then="run the same command again: it goes on from "
                                                  "where it stopped"):
        super().__init__(path)
        self.path, self.needed, self.free, self.then = path, needed, free, then

    def __str__(self):
        return (f"the disk is full: could not write {self.path} (it needs about "
                f"{_bytes(self.needed)}; {_bytes(self.free)} free in "
                f"{os.path.dirname(os.path.abspath(self.path))}); nothing was left half-written. "
                f"Free some space, then {self.then}")


def _bytes(n):
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _chain(error):
    """`error`, then the one it was raised from (__cause__) or while handling (__context__), ..."""
    seen = set()
    while error is not None and id(error) not in seen:  # (a cycle is possible)
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_almost_full(path, missing=0):
    """True if the disk that `path` goes on has less free space than 1 MiB (1% of a disk under
    100 MiB), or than `missing` bytes: a write there fails whatever writes it. A file system
    that cannot hold a file reports a little space free at most (part of a block)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:  # not made yet
        folder = os.path.dirname(folder)
    try:
        usage = shutil.disk_usage(folder)
    except OSError:  # cannot tell: not a full disk
        return False
    return usage.free < max(min(2 ** 20, usage.total // 100), missing)


def _size_of(path):
    """Bytes of a file, or of every file in a folder; 0 if there is nothing."""
    if os.path.isdir(path) and not os.path.islink(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                   if os.path.isfile(os.path.join(d, f)))
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _remove(path):
    """Delete a file, a link or a folder, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def save_torch(path, state):
    """torch.save of `state` to `path`, atomically. Through a Python file object: any name the
    file system allows works (torch's own writer wants UTF-8 names), and on a full disk torch's
    "unexpected pos" RuntimeError carries Python's ENOSPC as its context (disk_full reads it)."""
    size = sum(t.nelement() * t.element_size() for t in _tensors(state))  # about the file's size

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(path, write, size)


def _tensors(x):
    """Every tensor inside nested dicts, lists and tuples."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for item in x for t in _tensors(item)] if isinstance(x, (list, tuple)) else []


def write_text(path, text):
    """A text file (config, metrics, report, table, manifest), written atomically in UTF-8; a
    name that is not UTF-8 (Linux allows any bytes) is written back as its own bytes."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:  # not a code page
            f.write(text)
    atomic_write(path, write, len(text.encode("utf-8", "surrogateescape")))


def remove_temporaries(paths):
    """Delete what atomic_write may have left beside `paths` when a run was stopped while
    writing them (never a finished file, never anything else); a folder stepped aside whose
    replacement never arrived is put back. Returns how many were removed."""
    removed = 0
    for path in paths:
        stem, ext = os.path.splitext(path)
        for old in glob.glob(f"{glob.escape(stem)}.old*{ext}"):  # folders stepped aside
            if not os.path.exists(path):  # their replacement never arrived
                os.replace(old, path)  # put back
        for tmp in glob.glob(f"{glob.escape(stem)}.tmp*{ext}") + \
                glob.glob(f"{glob.escape(stem)}.old*{ext}"):  # old ones whose replacement arrived
            shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
            removed += 1
    return removed


def writable_folder(folder, what, advice=None):
    """Make `folder` (with its parents) if needed and check that a file can be written there,
    before any data loads; refused in one line that names the option (`what`) otherwise."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # a file really created there, then removed
            pass
    except OSError as error:
        raise DataError(f"{what} {folder}: cannot write there ({error.strerror or error}); "
                        f"{advice or 'choose another ' + what}") from error


def ascii_name(text, keep=80):
    """The plain-ASCII part of a name ([A-Za-z0-9._-], other runs of characters as one "-"), for
    folder and file names made from the user's names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:keep]


def load_torch_file(path, what):
    """A checkpoint or model file written by this project: tensors and plain containers only.
    Anything else is refused with one line: a pickled Python object could run code on loading."""
    if not os.path.isfile(path):
        raise DataError(f"{what} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no GPU needed
    except pickle.UnpicklingError as error:  # weights_only refused a Python object
        raise DataError(f"{what} {path}: refused for safety: the file holds Python objects "
                        f"other than tensors, which could run code when loaded. Use a file "
                        f"written by this project.") from error
    except Exception as error:  # a truncated zip, or no PyTorch file at all
        raise DataError(f"{what} {path}: not a complete PyTorch file ({type(error).__name__}); "
                        f"it may be truncated. Use a file written by this project.") from error
    if not isinstance(state, dict):
        raise DataError(f"{what} {path}: not a checkpoint of this project (no dictionary)")
    return state


def load_weights(module, state, key, path, what):
    """module.load_state_dict(state[key]), or one line saying the file is of another model."""
    try:
        module.load_state_dict(state[key])
    except (KeyError, RuntimeError, TypeError) as error:  # missing key, shape mismatch, not a dict
        detail = f"no {key!r} entry" if isinstance(error, KeyError) else \
            str(error).strip().splitlines()[0][:160]  # the first line of PyTorch's long report
        raise DataError(f"{what} {path}: its weights do not fit this model ({detail}); it was "
                        f"saved by a run with another --model, --loss, --embedding-dim or "
                        f"data") from error


# -----------------------------------------------------------------------------
# Locks: one process at a time writes a folder


@contextlib.contextmanager
def folder_lock(folder, busy=None):
    """Hold `folder` for this process while the block runs: an exclusive flock on the folder
    itself, which the kernel releases when the process ends, even killed (no stale lock file to
    delete). Another process that asks for it waits (and says so once), or, given `busy`, is
    refused with that one line. Without fcntl (Windows), or on a file system that refuses
    flock on a folder (some NFS mounts), nothing is locked, and the second case says so."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)  # a folder can be opened (and locked) like a file
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # NB: fails at once if held
        except BlockingIOError:
            if busy:
                raise DataError(busy) from None
            print(f"{folder}: another process is writing there; waiting until it is done",
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder ends
        except OSError as error:  # ENOLCK, EOPNOTSUPP, EBADF (NFS): go on without the lock
            print(f"{folder}: cannot be locked here ({error.strerror}); two processes writing "
                  f"there at once would not wait for each other", flush=True)
        yield
    finally:
        os.close(fd)  # releases the lock


# -----------------------------------------------------------------------------
# Figures: matplotlib on files only, with fonts for any class name


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, with fonts for non-ASCII class names:
    DejaVu Sans (bundled with matplotlib: Latin, Greek, Cyrillic), then any CJK font installed."""
    import matplotlib
    matplotlib.use("Agg")  # before pyplot's import: no GUI backend ever loads
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}  # fonts matplotlib found
    cjk = [name for name in ("Noto Sans CJK JP", "Noto Sans CJK SC", "Source Han Sans",
                             "WenQuanYi Zen Hei", "Droid Sans Fallback", "IPAexGothic",
                             "Microsoft YaHei", "MS Gothic", "PingFang SC", "Hiragino Sans")
           if name in installed]  # in this order of preference
    plt.rcParams["font.family"] = ["DejaVu Sans"] + cjk  # per-glyph fallback (matplotlib >= 3.6)
    return plt


def drawable(text):
    """`text` if the plot fonts hold all its characters, else an ASCII stand-in that keeps names
    apart ("U+87BA U+4E1D"): a missing glyph would be drawn as an empty box."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    fonts = [FT2Font(font_manager.findfont(family, fallback_to_default=False))  # a font per family
             for family in pyplot().rcParams["font.family"]]
    # get_char_index returns 0 when a font lacks the glyph
    if all(any(f.get_char_index(ord(ch)) for f in fonts) for ch in text if not ch.isspace()):
        return text
    return " ".join(ch if ord(ch) < 128 else f"U+{ord(ch):04X}" for ch in text)


def save_figure(fig, path, dpi=120):
    """Save a matplotlib figure as PNG (atomically) and close it. Returns the file's name."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"))
    pyplot().close(fig)  # frees the figure: pyplot keeps every open one
    return os.path.basename(path)


# -----------------------------------------------------------------------------
# Devices and processes (torchrun): where this process computes, and its share of the work


def to_device(x, device):
    """x on `device` without making the host wait: a host -> CUDA copy goes from pinned
    (page-locked) memory with non_blocking=True; from ordinary memory the driver may first wait
    for the GPU to finish everything queued (a hidden synchronisation in every step). Any other
    copy blocks (a non-blocking copy to the host could be read before it arrives). supcon.py
    keeps a copy of these lines for its own index vectors, so that it can be copied alone."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        # pin_memory() draws from PyTorch's cache of pinned buffers, which keeps each one until
        # its copy is done: the source cannot be overwritten while the copy is in flight
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)  # blocking; a no-op when x is there already


def pick_device(name):
    """--device: auto (CUDA, then Apple's MPS, then the CPU), or a torch device the user named,
    refused with one line when this machine does not have it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)  # "cpu", "cuda:1", ...; a typo raises RuntimeError
    except RuntimeError as error:
        raise DataError(f"--device {name}: not a device name (use auto, cpu, cuda, cuda:1, "
                        f"mps)") from error
    if device.type == "cuda" and (not torch.cuda.is_available() or
                                  (device.index or 0) >= torch.cuda.device_count()):
        raise DataError(f"--device {name}: no such CUDA GPU here "
                        f"({torch.cuda.device_count()} visible); use --device auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise DataError(f"--device {name}: Apple's MPS is not available here; use --device auto")
    return device


def init_distributed(device):
    """Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1): join the process group -- NCCL on
    CUDA, gloo on CPU -- and return this process's device (cuda:LOCAL_RANK); ranks other than 0
    print nothing from then on. In a plain `python` run it changes nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # torchrun sets WORLD_SIZE
        return device
    if device.type == "cuda":  # one GPU per process, the one torchrun assigned
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL and bare .cuda() calls use it
    if not torch.distributed.is_initialized():  # a second call joins nothing
        # env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE from torchrun
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if torch.distributed.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # one copy of every message, from rank 0
    return device


def distributed():
    """(rank, world size) of this process; (0, 1) when not running under torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier():
    """Wait until every process gets here (no-op in a single process)."""
    if distributed()[1] > 1:
        torch.distributed.barrier()


def end_process(status, message="", quiet=False):
    """Exit with `status` after `message` on stderr. Under torchrun, at once: torchrun stops
    every other worker within seconds of one exiting (a killed one too), so what matters is
    that a failed rank exits instead of waiting -- no destroy_process_group (NCCL's can block
    on a collective a dead peer never joins), no interpreter teardown (the script's finally and
    with-blocks have all run; its folder locks go with the process). The first rank to fail says
    why, "[rankN]: " before each line on ranks > 0; a later failure on another rank is a
    consequence of the first (a collective broken as it left, the same bad argument) and ends
    without a word, as a `quiet` one does."""
    rank, world = distributed()
    if world <= 1:
        if message:
            print(message, file=sys.stderr)
        sys.exit(status)
    first = not quiet and first_failure()
    if message and first:
        prefix = f"[rank{rank}]: " if rank else ""
        print("\n".join(prefix + line for line in message.rstrip("\n").split("\n")),
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def first_failure():
    """True on the first rank of this torchrun run to ask: a counter in the run's key-value store
    (torchrun's agent holds it, so it outlives any worker); True too if the store is out of
    reach -- a message twice rather than none."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))  # not the group's 30 minutes
        return store.add("failed ranks", 1) == 1  # atomic: exactly one rank gets 1
    except Exception:
        return True


# -----------------------------------------------------------------------------
# The command line: every value checked where argparse reads it, errors on one line


class Parser(argparse.ArgumentParser):
    """argparse with its error as one line ("prog: error: argument --lr: ..."), not the usage
    block first, and the module docstring as the help text."""

    def __init__(self, description, prog, **kwargs):
        super().__init__(description=description, prog=prog, **kwargs,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps line breaks

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")  # 2: as argparse's own


def _number(kind, low=None, high=None, low_open=False, high_open=False, what=""):
    """An argparse `type` that reads a finite number of `kind` within [low, high] (or open
    ends), so that --lr nan or --batch-size 0 costs a second, not a data load."""
    def read(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):  # float() parses nan, inf
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        # low_open / high_open: the bound itself is outside
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    read.checked = True  # marks a validated numeric option (tests/test_inputs.py looks for it)
    return read


def int_at_least(low):
    """type=: an integer >= low."""
    return _number(int, low, what=f"an integer >= {low}")


def float_at_least(low, strict=False):
    """type=: a finite number >= low (> low with strict)."""
    return _number(float, low, low_open=strict, what=f"a number {'>' if strict else '>='} {low}")


def float_in(low, high, low_open=False, high_open=False):
    """type=: a finite number in the interval given."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return _number(float, low, high, low_open, high_open, what=f"a number in {interval}")


def strength_list(text):
    """type=: 'a,b,c' -> sorted strengths in (0, 1]."""
    read = float_in(0, 1, low_open=True)
    values = sorted({read(t.strip()) for t in text.split(",") if t.strip()})  # a set: no duplicates
    if not values:
        raise argparse.ArgumentTypeError("needs at least one strength, e.g. 0.3,0.5,0.7")
    return values


strength_list.checked = True  # as _number's readers: a validated type


def add_data_arguments(parser):
    """The data options, shared by train.py, data.py, dafusion.py and evaluate.py."""
    d = parser.add_argument_group("data")
    d.add_argument("--data", default="digits",
                   help="digits (default, bundled with scikit-learn), mnist, fashion-mnist, "
                        "cifar10, or PATH to an image folder (PATH/train + PATH/test, or "
                        "PATH/<class>/)")
    d.add_argument("--data-root", default="./.data", help="where torchvision data sets live")
    d.add_argument("--download", action="store_true", help="allow torchvision to download")
    d.add_argument("--image-size", type=int_at_least(8), default=None,
                   help="side in pixels (default: native; digits 16, MNIST 28, CIFAR 32, "
                        "folders 32)")
    d.add_argument("--resize", choices=["crop", "letterbox"], default="crop",
                   help="folders: centre-crop the short side, or letterbox (keep aspect, black)")
    # [0, 1): a fraction of 1 would leave no training image
    d.add_argument("--val-fraction", type=float_in(0, 1, high_open=True), default=0.25,
                   help="test share when a source has no test split (digits, single folder)")
    d.add_argument("--examples-per-class", type=int_at_least(1), default=None,
                   help="few-shot: keep K training images per class (seeded)")
    d.add_argument("--ood-classes", default=None,  # None: DEFAULT_OOD of the source
                   help="classes held out of training; their test images are the near-OOD test "
                        "set (names or indices, comma-separated; default for digits: 8,9; '' "
                        "for none)")
    d.add_argument("--masks", default=None,  # crop_to_mask, dilation 0.1
                   help="folder of object masks, MASKS/<image path relative to --data>.png "
                        "(white = object): crop a square around each dilated mask (the thesis)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images of --data out (counted)")
    d.add_argument("--seed", type=_number(int, 0, 2**32 - 1, what="an integer from 0 to 2^32-1"),
                   default=0,
                   help="seed of splits, sampling, augmentation, initialisation")
    return parser


def add_synthetic_arguments(parser):
    """Which synthetic images a run uses, and in which role (train.py; evaluate.py reads them
    back from a run's config)."""
    s = parser.add_argument_group("synthetic data (DA-Fusion, see dafusion.py)")
    s.add_argument("--synthetic", default=None,
                   help="folder with manifest.csv written by dafusion.py; without it, "
                        "--positives / --negatives generate with the ddpm generator into a "
                        "cache (.cache/dafusion)")
    s.add_argument("--positives", choices=["none", "id", "id+near_ood"], default="none",
                   help="id: the in-distribution synthetic images as extra labelled samples; "
                        "id+near_ood: the near-OOD ones too, as plain positives (an ablation)")
    s.add_argument("--negatives", choices=["none", "near_ood", "id"], default="none",
                   help="near_ood: the near-OOD synthetic images as negative-only samples; id: "
                        "the ID ones instead (a placebo)")
    s.add_argument("--negative-data", default=None, metavar="PATH",
                   help="real images used only as negatives (never anchors, positives or probe "
                        "images): PATH/<training class>/ ones for that class's anchors, all "
                        "others for every anchor; with --outlier-exposure, its outliers")
    s.add_argument("--near-ood-strength", type=float_in(0, 1, low_open=True), default=None,
                   help="of a set with several near-OOD strengths (dafusion.py --strengths), "
                        "use only this one")
    s.add_argument("--no-real", action="store_true",
                   help="train on the synthetic positives alone (the fruit project's "
                        "'synthetic only')")
    # %% below: argparse %-formats help strings
    s.add_argument("--synthetic-margin", action="store_true",
                   help="cut 20-30%% off top and bottom of square synthetic images (use with "
                        "--resize letterbox)")
    s.add_argument("--drop-leaking-synthetic", action="store_true",
                   help="leave out manifest rows that vary images this run does not train on "
                        "(test or held-out images), instead of refusing the set")
    return parser


def settings(*layers):
    """A new Namespace from Namespaces and dicts, a later layer's values winning; the layers stay
    as they are. The one way every script fills defaults, saved settings and overrides in."""
    merged = {}
    for layer in layers:
        merged.update(vars(layer) if isinstance(layer, argparse.Namespace) else layer)
    return argparse.Namespace(**merged)


def unset_only(args, defaults):
    """The entries of `defaults` whose option is None in args (a value the user gave wins)."""
    return {k: v for k, v in defaults.items() if getattr(args, k, None) is None}


def refuse_without_effect(given, used_by, value, where, names=None):
    """An option typed on the command line that this run would not read is refused in one line:
    used_by maps an option's dest to the values (of --loss, --generator, ...) that read it;
    value is this run's, `where` says it ("with --loss triplet"); names: display names of dests
    that are not plain --options."""
    for dest in sorted(given & set(used_by)):  # sorted: the same first complaint every run
        if value not in used_by[dest]:
            name = (names or {}).get(dest, f"--{dest.replace('_', '-')}")
            raise DataError(f"{name} has no effect {where}; it is for "
                            f"{' and '.join(used_by[dest])}")


def refuse_both(given, first, second, advice):
    """Two options that say the same thing twice (--epochs, --train-steps): one may be typed."""
    if {first, second} <= given:
        raise DataError(f"--{first.replace('_', '-')} and --{second.replace('_', '-')} both "
                        f"given; {advice}")


def changed_settings(saved, current, keys, strict=False):
    """[(key, saved value, current value)] for the keys whose saved value differs: what a folder
    was made with against what a command asks now (a resumed run, a synthetic set, a DDPM).
    Keys the folder did not save (options added since) do not count, unless strict (then a
    missing key differs: a DDPM whose data fingerprint is unknown is never reused)."""
    return [(k, saved.get(k), current[k]) for k in keys
            if (k in saved or strict) and saved.get(k) != current[k]]


# A run's config.json (train.py --resume RUN, evaluate.py RUN): the settings that every version
# of train.py has written, since its first (bbd5aa8), and what each holds (float: any finite
# number; a tuple with None: null too). A file without one of them was not written by train.py,
# or was cut or edited. The options added since are not here: an older run lacks them, and
# --resume and evaluate.py fill them from today's defaults ("options added after the run
# started"); the command's own parser checks their values.
RUN_SETTINGS = {
    # data
    "data": str, "data_root": str, "download": bool, "image_size": (int, None), "resize": str,
    "val_fraction": float, "examples_per_class": (int, None), "ood_classes": (str, None),
    "masks": (str, None), "skip_bad_images": bool, "seed": int,
    # synthetic data and batches
    "synthetic": (str, None), "positives": str, "negatives": str, "negatives_per_batch": float,
    "m_per_class": int, "synthetic_margin": bool,
    # model and loss
    "model": str, "pretrained": bool, "embedding_dim": int, "loss": str, "temperature": float,
    "base_temperature": (float, None), "hard_negatives": str, "negative_weight": float,
    "chunk_size": int, "margin": float, "mining": str, "distance": str, "mining_scope": str,
    "augment": str,
    # optimisation and the run
    "epochs": int, "batch_size": int, "optimizer": str, "lr": float, "weight_decay": float,
    "warmup_epochs": float, "linear_epochs": int, "device": str, "out": str,
    "name": (str, None), "resume": (str, None)}
KIND_NAMES = {str: "text", int: "an integer", float: "a number", bool: "true or false"}


def read_run_settings(run_dir, what, parser, written, known=None):
    """The settings saved in run_dir/config.json, read strictly, or one line that names the file
    (and the setting) and what to do: no file, an empty one, one that is not JSON (cut short) or
    not a JSON object, another program's (a setting not in `known`, the settings train.py
    writes, or few of RUN_SETTINGS), a setting of RUN_SETTINGS missing, or a value of the wrong
    kind (check_run_settings). `what` starts each line ("--resume "); `parser` and `written`:
    the command's parser and the settings it writes for a run of default settings."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise DataError(f"{what}{run_dir}: no config.json there; pass a run folder that train.py "
                        f"made")
    fix = "restore the config.json that train.py wrote, or start a new run"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeError) as error:
        raise DataError(f"{what}{path}: cannot be read ({error}); {fix}") from None
    if not text.strip():
        raise DataError(f"{what}{path}: empty (cut short when it was written?); {fix}")
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{what}{path}: not valid JSON ({error.msg}: line {error.lineno}, "
                        f"column {error.colno}); cut short, or edited? {fix}") from None
    if not isinstance(saved, dict):
        raise DataError(f"{what}{path}: holds a JSON {type(saved).__name__}, not the settings "
                        f"of a train.py run; pass a run folder that train.py made")
    check_run_settings(saved, f"{what}{path}", fix, parser, written, known)
    return saved


def check_run_settings(saved, where, fix, parser, written, known=None):
    """Refuse a config.json's settings (dict) in one line: another program's (a key not in
    `known`, or under half of RUN_SETTINGS), one of RUN_SETTINGS missing or not of its kind, or
    a setting `parser` knows that its command line would not give: read as its typed text by
    the option's own type and choices; null only where the command writes null itself."""
    foreign = sorted(set(saved) - set(known)) if known is not None else []
    missing = [key for key in RUN_SETTINGS if key not in saved]
    if foreign or len(missing) > len(RUN_SETTINGS) / 2:
        detail = f"{foreign[0]!r}, which train.py never writes" if foreign else \
            f"{len(missing)} of the {len(RUN_SETTINGS)} settings every train.py run has, e.g. " \
            f"{missing[0]!r}"
        raise DataError(f"{where}: not the settings of a train.py run (another program's?): "
                        f"it {'holds' if foreign else 'lacks'} {detail}; pass a run folder "
                        f"that train.py made")
    if missing:
        raise DataError(f"{where}: the setting {missing[0]!r} is missing (every train.py run "
                        f"has it); {fix}")
    actions = {a.dest: a for a in parser._actions if a.dest in saved}
    for key, value in saved.items():
        kind = RUN_SETTINGS.get(key, ())
        kinds = kind if isinstance(kind, tuple) else (kind,)
        problem = _kind_problem(value, kinds) if key in RUN_SETTINGS else ""
        if not problem and key in actions:
            problem = _option_problem(actions[key], value, written.get(key) is None)
        if problem:
            raise DataError(f"{where}: the setting {key!r} (--{key.replace('_', '-')}) is "
                            f"{json.dumps(value)[:60]}, {problem}; {fix}")


def _kind_problem(value, kinds):
    """'' if value (from JSON) is of one of `kinds` (RUN_SETTINGS), else what it should be."""
    if value is None:
        ok = None in kinds
    elif isinstance(value, bool):  # before int: True is an int to Python
        ok = bool in kinds
    elif isinstance(value, (int, float)):
        ok = (int in kinds and isinstance(value, int)) or (float in kinds and math.isfinite(value))
    else:
        ok = type(value) in kinds
    return "" if ok else "not " + " or ".join(KIND_NAMES[k] for k in kinds if k is not None)


def _option_problem(action, value, may_be_null):
    """'' if a saved value is what the command line gives for some typed text: that text, read
    by the option's own type and choices, gives the value back; else what is wrong."""
    if value is None:
        return "" if may_be_null else "where a value is needed"
    if action.nargs == 0:  # a flag: store_true
        return "" if isinstance(value, bool) else "not true or false"
    if action.type is None and not isinstance(value, str):  # a name, a path: typed as text
        return "not text"
    if isinstance(value, (bool, dict)):
        return "not a value this option takes"
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)  # as typed
    try:
        typed = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
        return str(error) or "not a value this option takes"
    if action.choices is not None and typed not in action.choices:
        return f"not one of {', '.join(map(str, action.choices))}"
    if typed != value or isinstance(typed, str) != isinstance(value, str):  # "0.5" for 0.5
        return f"not what --{action.dest.replace('_', '-')} {text} gives"
    return ""


def check_named_files(args):
    """The folders and files the data and synthetic options name, before any data loads."""
    if args.masks and not os.path.isdir(args.masks):
        raise DataError(f"--masks {args.masks}: no such folder")
    if getattr(args, "synthetic", None):
        require_manifest(args.synthetic, "--synthetic")
    if getattr(args, "negative_data", None) and not os.path.isdir(args.negative_data):
        raise DataError(f"--negative-data {args.negative_data}: no such folder")


def given_options(parser, argv):
    """The dests of the options typed on the command line (argv None: sys.argv[1:]). argparse
    cannot tell a default from a value the user typed; a copy of the parser without defaults can."""
    quiet = copy.deepcopy(parser)  # a deep copy: the caller's parser keeps its defaults
    for action in quiet._actions:
        action.default, action.required = argparse.SUPPRESS, False  # untyped: no attribute at all
    return set(vars(quiet.parse_known_args(argv)[0]))


def splits_from_args(args):
    """load_data with the options of add_data_arguments."""
    return load_data(args.data, args.data_root, args.download, args.image_size, args.val_fraction,
                     args.seed, args.examples_per_class, args.ood_classes, args.resize,
                     args.skip_bad_images, args.masks)


def run_command(main, argv=None):
    """Run a script's main(argv) as a command: bad input (DataError) is one line on stderr and
    exit status 1, Ctrl-C exit status 130 after the script's own one-line message. File names
    that are not UTF-8 (any bytes are a legal name on Linux) are printed as their own bytes, as
    ls prints them. Under torchrun a rank that fails exits at once, its message printed once
    for all ranks (end_process), and torchrun then stops the others."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a text stream: the name's own bytes go out
            stream.reconfigure(errors="surrogateescape")
    try:
        result = main(argv)
    except (DataError, RunError) as error:
        end_process(1, f"error: {error}")
    except OtherRankFailed:  # rank 0 says why
        end_process(1, quiet=True)
    except KeyboardInterrupt:
        end_process(130)  # 128 + SIGINT (2), the shell's convention
    except Exception:  # a bug, or (torchrun) a collective broken by another rank's end
        if distributed()[1] <= 1:
            raise  # Python's traceback, as always
        end_process(1, traceback.format_exc())
    if distributed()[1] > 1:  # a clean end leaves the group (NCCL warns otherwise)
        torch.distributed.destroy_process_group()
    return result


def main(argv=None):
    """data.py's command line: what a configuration loads, and a grid of augmented views."""
    parser = add_data_arguments(Parser(__doc__, "data.py"))
    parser.add_argument("--augment", default="rotation", choices=["none", "rotation", "simclr"])
    args = parser.parse_args(argv)
    splits = splits_from_args(args)
    print(f"classes {splits.classes}; held out as OOD: {splits.ood_classes or 'none'}")
    ood = tuple(splits.ood_test.images.shape) if splits.ood_test else None  # None: none held out
    print(f"train {tuple(splits.train.images.shape)}  test {tuple(splits.test.images.shape)}  "
          f"ood test {ood}")
    import torchvision
    g = torch.Generator().manual_seed(args.seed)  # the same views for the same --seed
    imgs = splits.train.images[:8]  # (8, C, H, W) uint8: the first row
    # mean 0 and std 1: the views stay in [0, 1], as save_image expects
    views = [imgs.float() / 255] + [augment(imgs, args.augment, g, torch.zeros(1),
                                            torch.ones(1)).clamp(0, 1) for _ in range(3)]
    atomic_write("data_preview.png",
                 lambda tmp: torchvision.utils.save_image(torch.cat(views), tmp, nrow=8))
    print("wrote data_preview.png (rows: original, then three augmented views)")


if __name__ == "__main__":
    run_command(main)

