"""
data.py -- real and synthetic images, few-shot and open-set splits, batch sampling and batched
augmentations for supervised contrastive learning with DA-Fusion augmentations.

Every source ends up as one ImageSet: a uint8 tensor (N, C, H, W) held in memory plus labels, a
negative-only flag (near-OOD synthetic images, thesis section "re-engineered loss") and a kind
(real / synthetic ID / synthetic near-OOD). Augmentations then run batched on the training device
with per-sample random parameters (SimCLR, Chen et al. 2020, Appendix A), so the same code feeds a
laptop CPU and a GPU. Sources:

  digits                   sklearn's bundled handwritten digits (default; no download)
  mnist | fashion-mnist | cifar10   torchvision data sets under --data-root (--download to fetch)
  PATH                     a folder in ImageFolder layout: PATH/train + PATH/test, or PATH/<class>/
                           split by a seeded, stratified --val-fraction
  --synthetic DIR          images written by dafusion.py, listed in DIR/manifest.csv

Run `python data.py --data digits` to print what a configuration loads (sizes, classes, held-out
OOD classes) and write a grid of augmented views to data_preview.png.
"""

import argparse
import csv
import functools
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BUILTIN = ("digits", "mnist", "fashion-mnist", "cifar10")
NATIVE_SIZE = {"digits": 16, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}  # digits: 8 px upscaled
DEFAULT_OOD = {"digits": "8,9"}  # held-out classes of the default run (open-set OOD test)
KIND_REAL, KIND_ID, KIND_NEAR_OOD = 0, 1, 2  # ImageSet.kind: where an image came from


class DataError(ValueError):
    """Bad input data: the message names the file or argument and says what to do."""


@dataclass
class ImageSet:
    """Images in memory. images (N, C, H, W) uint8; labels (N,) long in [0, len(classes));
    negative_only (N,) bool; kind (N,) int8 (KIND_*); names: where each image came from."""
    images: torch.Tensor  # (N, C, H, W) uint8, decoded once
    labels: torch.Tensor  # (N,) long class ids; a near-OOD image carries its source image's class
    classes: list  # class names; labels index this list
    negative_only: torch.Tensor = None  # (N,) bool, True = never an anchor or a positive (default: all False)
    kind: torch.Tensor = None  # (N,) int8 KIND_REAL / KIND_ID / KIND_NEAR_OOD (default: all real)
    names: list = field(default_factory=list)  # file path or "<source>/<index>" of each image

    def __post_init__(self):
        n = len(self.images)  # every per-image field must have n entries
        if self.negative_only is None:  # a real data set: every image may be an anchor
            self.negative_only = torch.zeros(n, dtype=torch.bool)
        if self.kind is None:  # and every image is a real one
            self.kind = torch.full((n,), KIND_REAL, dtype=torch.int8)
        # a mismatch here would silently pair images with the wrong labels later
        if len(self.labels) != n or len(self.negative_only) != n or len(self.kind) != n:
            raise DataError(f"ImageSet: {n} images but {len(self.labels)} labels")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            # name the first offending label, so the user can find it
            bad = self.labels[(self.labels < 0) | (self.labels >= len(self.classes))][0].item()
            raise DataError(f"label {bad} is out of range for {len(self.classes)} classes "
                            f"{self.classes}; labels must be 0..{len(self.classes) - 1}")

    def __len__(self):
        return len(self.images)

    def subset(self, index):
        """The images at `index` (a LongTensor), with their labels, flags and names."""
        index = torch.as_tensor(index, dtype=torch.long)  # (n,) rows to keep, in this order
        return ImageSet(self.images[index], self.labels[index], self.classes,
                        self.negative_only[index], self.kind[index],
                        [self.names[i] for i in index.tolist()] if self.names else [])

    @staticmethod
    def concat(sets):
        """One ImageSet from several (None and empty entries are skipped); they share the class list."""
        sets = [s for s in sets if s is not None and len(s)]  # None = a part left out (--no-real)
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                        sets[0].classes, torch.cat([s.negative_only for s in sets]),
                        torch.cat([s.kind for s in sets]), sum((s.names for s in sets), []))


# -----------------------------------------------------------------------------
# Reading images from disk


def resize_pil(image, size, mode="crop"):
    """PIL image -> size x size. mode "crop": scale the short side, centre-crop; "letterbox": scale
    to fit and paste centred on a black canvas (keeps the aspect ratio, the seed fruit project)."""
    w, h = image.size
    if mode == "letterbox":  # whole image, padded to a square (the seed fruit project)
        scale = size / max(w, h)  # the long side becomes `size`
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        canvas = Image.new(image.mode, (size, size))  # black, same mode (L or RGB)
        canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2))
        return canvas
    scale = size / min(w, h)  # the short side becomes `size`, the long one is cropped
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2  # centre crop
    return image.crop((left, top, left + size, top + size))


def crop_to_mask(image, mask, dilation=0.1):
    """The thesis's preprocessing: a square crop around the object mask, its box dilated by
    `dilation` of its size on every side (clipped to the image)."""
    box = np.argwhere(np.asarray(mask.convert("L").resize(image.size)) > 127)  # (P, 2) (row, col) of object pixels
    if len(box) == 0:
        return image
    (top, left), (bottom, right) = box.min(0), box.max(0) + 1  # the object's bounding box
    side = max(bottom - top, right - left) * (1 + 2 * dilation)  # a square around the box, with margin
    cy, cx = (top + bottom) / 2, (left + right) / 2  # centred on the box
    return image.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))


def synthetic_margin_crop(image, rng, low=0.2, high=0.3):
    """Square synthetic images get a random 20-30% cut off top and bottom (split evenly), so that
    after letterboxing they carry black margins like the real photos (the seed fruit project)."""
    w, h = image.size
    if w != h:
        return image
    cut = round(h * rng.uniform(low, high) / 2)  # pixels off the top and off the bottom each
    return image.crop((0, cut, w, h - cut))


def open_image(path, channels, size, resize="crop", mask_path=None, margin_rng=None):
    """Read one image file as a (C, size, size) uint8 tensor; raises DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()  # force decoding now: truncated files fail here, not later
            img = img.convert("L" if channels == 1 else "RGB")  # one mode for the whole set
    except Exception as error:
        raise DataError(f"{path}: cannot read this image ({error}). Replace or delete the file, "
                        f"or pass --skip-bad-images to leave unreadable files out.") from error
    if mask_path is not None:
        if not os.path.exists(mask_path):
            raise DataError(f"{mask_path}: no mask for {path}. --masks DIR needs one mask per "
                            f"image at DIR/<same relative path>.png (white = object).")
        with Image.open(mask_path) as mask:
            img = crop_to_mask(img, mask)  # the thesis: crop around the object first
    if margin_rng is not None:
        img = synthetic_margin_crop(img, margin_rng)
    array = np.asarray(resize_pil(img, size, resize), dtype=np.uint8)  # (size, size) or (size, size, 3)
    return torch.from_numpy(array.reshape(size, size, channels).copy()).permute(2, 0, 1)  # (C, size, size) uint8


def list_class_folders(root):
    """ImageFolder layout: root/<class>/<images>. Returns (class names, [(path, class index)])."""
    # sorted: class ids do not depend on the file system
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class folders. Expected ImageFolder layout: "
                        f"{root}/<class name>/<image files>.")
    items = []  # (path, class index) for every image
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        # sorted: repeatable order
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"{folder}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)}). "
                            f"Add images or remove the folder.")
        items += [(os.path.join(folder, f), index) for f in files]
    return classes, items


def guess_channels(paths):
    """1 if every image (of the first 50) is greyscale, else 3."""
    for path in paths[:50]:
        try:
            with Image.open(path) as img:
                if img.mode not in ("L", "1", "I", "I;16", "LA"):
                    return 3
        except Exception:
            continue  # open_image reports unreadable files properly
    return 1


def _read_image(job):
    """open_image for load_files' workers: (C, size, size) uint8 numpy array, or the DataError."""
    path, channels, size, resize, mask_path = job  # one picklable tuple per image
    try:
        return open_image(path, channels, size, resize, mask_path).numpy()
    except DataError as error:
        return error  # returned, not raised: --skip-bad-images decides what happens


def load_files(items, classes, channels, size, resize, skip_bad, masks_dir=None, root=None):
    """[(path, label)] -> ImageSet; with skip_bad, unreadable files are dropped and counted."""
    jobs = []  # (path, channels, size, resize, mask path) for each image
    for path, _ in items:
        mask_path = None
        if masks_dir is not None:
            # DIR/<relative path>.png
            mask_path = os.path.join(masks_dir, os.path.splitext(os.path.relpath(path, root))[0] + ".png")
        jobs.append((path, channels, size, resize, mask_path))
    workers = min(16, os.cpu_count() or 1)  # processes for decoding
    if len(jobs) >= 5000 and workers > 1:
        # large folders in worker processes: decoding small JPEGs is mostly Python work in PIL,
        # which threads cannot share (the GIL). CIFAR-10's 60,000 files: seconds on 16 cores.
        # "spawn": the workers start clean, whatever threads or CUDA state this process has
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            decoded = list(tqdm(pool.map(_read_image, jobs, chunksize=256), total=len(jobs),
                                desc=f"reading {root}", leave=False))
    else:
        decoded = [_read_image(job) for job in jobs]  # small sets: no process start-up cost
    images, labels, names, bad = [], [], [], []  # (C, H, W) tensors, ints, paths, skipped paths
    for (path, label), image in zip(items, decoded):
        if isinstance(image, DataError):
            if not skip_bad:
                raise image
            bad.append(path)
            continue
        images.append(torch.from_numpy(image))
        labels.append(label)
        names.append(path)
    if bad:
        print(f"--skip-bad-images: left out {len(bad)} unreadable file(s), e.g. {bad[0]}")
    if not images:
        raise DataError(f"no readable images under {root}")
    return ImageSet(torch.stack(images), torch.tensor(labels), classes, names=names)  # images (N, C, H, W) uint8


# -----------------------------------------------------------------------------
# Sources


def stratified_split(labels, fraction, seed):
    """Indices (keep, held) with `fraction` of every class held out, seeded."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(len(idx) * fraction))  # the same share of every class (stratified)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    # sorted: the original order within each split
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def load_digits(val_fraction, seed, size):
    """sklearn's 8x8 digits, upscaled to `size` px; a seeded, stratified train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()  # 1,797 8x8 images shipped inside scikit-learn
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)  # (1797, 1, size, size)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # uint8 like every other source
    labels = torch.tensor(digits.target)  # (1797,) 0..9
    full = ImageSet(images, labels, [str(i) for i in range(10)],
                    names=[f"digits/{i:04d}" for i in range(len(labels))])
    train_idx, test_idx = stratified_split(labels, val_fraction, seed)  # the same share of every class
    return full.subset(train_idx), full.subset(test_idx)


def load_torchvision(name, root, download, size):
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision's files under `root` (downloads only if asked)."""
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=download)
        except RuntimeError as error:
            raise DataError(
                f"--data {name}: not found under --data-root {root} ({error}). Either pass "
                f"--download to fetch it, or point --data-root at a folder that holds it.") from error
        x = torch.as_tensor(np.asarray(ds.data))  # (N, H, W) grey or (N, H, W, 3) colour, uint8
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        if x.shape[-1] != size:  # resized once here, not per batch
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        labels = torch.as_tensor(np.asarray(ds.targets))  # (N,)
        splits.append(ImageSet(x, labels, list(ds.classes),
                               names=[f"{name}/{'train' if train else 'test'}/{i}" for i in range(len(x))]))
    return splits


def load_folder(path, val_fraction, seed, size, resize, skip_bad, masks_dir):
    """An ImageFolder-layout folder: PATH/train + PATH/test, or PATH/<class>/ split by `val_fraction`."""
    if not os.path.isdir(path):
        raise DataError(f"--data {path}: not a folder and not one of {', '.join(BUILTIN)}.")
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")  # a given split
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        classes, train_items = list_class_folders(train_dir)
        test_classes, test_items = list_class_folders(test_dir)
        if test_classes != classes:  # class ids must mean the same in both splits
            raise DataError(f"{test_dir}: its class folders {test_classes} differ from "
                            f"{train_dir}'s {classes}; both splits need the same classes.")
        channels = guess_channels([p for p, _ in train_items])  # one channel count for both splits
        train = load_files(train_items, classes, channels, size, resize, skip_bad, masks_dir, path)
        test = load_files(test_items, classes, channels, size, resize, skip_bad, masks_dir, path)
        return train, test
    classes, items = list_class_folders(path)  # one folder: split it ourselves
    channels = guess_channels([p for p, _ in items])  # 1 for greyscale sets, else 3
    full = load_files(items, classes, channels, size, resize, skip_bad, masks_dir, path)
    train_idx, test_idx = stratified_split(full.labels, val_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


def parse_class_list(text, classes, what="--ood-classes"):
    """'a,b' (names or indices) -> sorted list of class indices."""
    chosen = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if item in classes:
            chosen.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):
            chosen.append(int(item))
        else:
            raise DataError(f"{what}: {item!r} is not a class; the classes are {classes}")
    return sorted(set(chosen))


def few_shot_indices(labels, k, seed):
    """K examples per class (all of a class that has fewer), seeded."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).squeeze(1)
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values


@dataclass
class Splits:
    """What a run trains and tests on. Class ids are re-numbered 0..K-1 over the training classes;
    ood_test holds the test images of the held-out classes, its labels 0..len(ood_classes)-1
    indexing ood_classes (for few-shot episodes on unseen classes)."""
    train: ImageSet  # the training images of the K training classes (few-shot subset if asked)
    test: ImageSet  # the test images of the same K classes
    ood_test: ImageSet  # the test images of the held-out classes (empty without --ood-classes)
    classes: list  # the K training class names, in label order
    ood_classes: list  # the held-out class names
    source_classes: list  # every class of the source, held-out ones included


def remap(s, keep_classes):
    """Keep only images of keep_classes and renumber their labels 0..len(keep_classes)-1."""
    lookup = torch.full((len(s.classes),), -1, dtype=torch.long)  # old class id -> new id, -1 = dropped
    lookup[torch.tensor(keep_classes, dtype=torch.long)] = torch.arange(len(keep_classes))
    idx = torch.nonzero(lookup[s.labels] >= 0).squeeze(1)  # images of the kept classes
    sub = s.subset(idx)  # the kept images, still with their old labels
    return ImageSet(sub.images, lookup[sub.labels], [s.classes[c] for c in keep_classes],
                    sub.negative_only, sub.kind, sub.names)


def load_data(data="digits", data_root="./.data", download=False, image_size=None,
              val_fraction=0.25, seed=0, examples_per_class=None, ood_classes=None,
              resize="crop", skip_bad_images=False, masks=None):
    """Load a source and make the splits: few-shot training subset, test set, held-out OOD test."""
    size = image_size or NATIVE_SIZE.get(data, 32)  # pixels per side for every image
    if data == "digits":
        train, test = load_digits(val_fraction, seed, size)
    elif data in BUILTIN:
        train, test = load_torchvision(data, data_root, download, size)
    else:
        train, test = load_folder(data, val_fraction, seed, size, resize, skip_bad_images, masks)
    if masks and data in BUILTIN:
        raise DataError("--masks works with image folders (--data PATH) only")
    source_classes = list(train.classes)  # before the OOD classes are taken out
    if ood_classes is None:
        ood_classes = DEFAULT_OOD.get(data, "")
    held = parse_class_list(ood_classes, source_classes)  # indices of the held-out classes
    kept = [c for c in range(len(source_classes)) if c not in held]  # the classes the model trains on
    if len(kept) < 2:
        raise DataError(f"--ood-classes leaves {len(kept)} training class(es); at least 2 are needed")
    ood_test = remap(test, held) if held else None  # labels index the held-out classes
    train, test = remap(train, kept), remap(test, kept)  # labels renumbered 0..K-1
    if examples_per_class:
        train = train.subset(few_shot_indices(train.labels, examples_per_class, seed))  # seeded few-shot subset
    return Splits(train, test, ood_test, train.classes, [source_classes[c] for c in held], source_classes)


# -----------------------------------------------------------------------------
# Synthetic images written by dafusion.py

MANIFEST_COLUMNS = ("path", "label", "kind", "source", "strength", "seed")


def read_manifest(folder, classes, image_size, channels, resize="crop", margin=False, seed=0):
    """DIR/manifest.csv -> ImageSet of synthetic images. kind "id" rows are labelled training
    samples; "near_ood" rows are negative-only samples carrying their source class."""
    manifest = os.path.join(folder, "manifest.csv")  # written by dafusion.py
    if not os.path.exists(manifest):
        raise DataError(f"--synthetic {folder}: no manifest.csv there. Generate the images with "
                        f"`python dafusion.py --out {folder}` or point --synthetic at such a folder.")
    rng = np.random.default_rng(seed)  # the random margin crops (--synthetic-margin), repeatable
    images, labels, kinds, names = [], [], [], []  # one entry per manifest row
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest}: missing column(s) {missing}; needs {list(MANIFEST_COLUMNS)}")
        for line, row in enumerate(reader, start=2):  # line 1 is the header: numbers match an editor's
            if row["label"] not in classes:
                raise DataError(f"{manifest}, line {line}: class {row['label']!r} is not a class of "
                                f"the real training data {classes}. Regenerate the synthetic set for "
                                f"this data, or delete the rows of that class.")
            if row["kind"] not in ("id", "near_ood"):
                raise DataError(f"{manifest}, line {line}: kind {row['kind']!r} must be 'id' or 'near_ood'")
            path = os.path.join(folder, row["path"])
            if not os.path.exists(path):
                raise DataError(f"{manifest}, line {line}: {path} does not exist. Re-run dafusion.py "
                                f"on {folder} to regenerate missing images (it resumes).")
            images.append(open_image(path, channels, image_size, resize,
                                     margin_rng=rng if margin else None))
            labels.append(classes.index(row["label"]))  # the class name -> this run's class id
            kinds.append(KIND_ID if row["kind"] == "id" else KIND_NEAR_OOD)
            names.append(path)
    if not images:
        raise DataError(f"{manifest}: no rows")
    kind = torch.tensor(kinds, dtype=torch.int8)  # (N,) KIND_ID or KIND_NEAR_OOD
    return ImageSet(torch.stack(images), torch.tensor(labels), list(classes),
                    kind == KIND_NEAR_OOD, kind, names)


# -----------------------------------------------------------------------------
# Batches: m images per class, and a controlled share of negative-only images


def contrastive_batches(labels, negative_only, batch_size, m_per_class=4, negatives_share=0.25,
                        seed=0, epoch=0):
    """One epoch of batches (a list of index tensors), deterministic in (seed, epoch).

    Labelled samples come in groups of m (or m+1) of one class, so every anchor has a positive
    (a class with a single image cannot give it one). When negative-only samples exist, a share
    `negatives_share` of each batch is negative-only, drawn from the classes in that batch so that
    same-class hard-negative masking has something to contrast. Every labelled sample appears once.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)  # one stream per (seed, epoch)
    real = torch.nonzero(~negative_only).squeeze(1)  # labelled samples: real and synthetic ID
    negatives = torch.nonzero(negative_only).squeeze(1)  # near-OOD samples
    n_neg = int(round(batch_size * negatives_share)) if len(negatives) else 0  # per batch
    n_real = max(m_per_class, batch_size - n_neg)  # labelled samples per batch
    groups = []  # chunks of m same-class indices
    for c in torch.unique(labels[real]).tolist():
        idx = real[labels[real] == c]  # every labelled sample of class c
        idx = idx[torch.randperm(len(idx), generator=g)]  # in a fresh order each epoch
        chunks = list(torch.split(idx, m_per_class))  # groups of m
        if len(chunks) > 1 and len(chunks[-1]) == 1:  # no lone image: it would have no positive
            chunks[-2:] = [torch.cat(chunks[-2:])]
        groups += chunks
    # shuffle the groups and pack them into batches of about n_real labelled samples
    order = torch.randperm(len(groups), generator=g).tolist()
    batches, current, filled = [], [], 0  # finished batches; groups of the batch being filled; its size
    for gi in order:
        current.append(groups[gi])
        filled += len(groups[gi])
        if filled >= n_real:  # full: close this batch, start the next
            batches.append(torch.cat(current))
            current, filled = [], 0
    if current:  # the last, smaller batch (every labelled sample appears once)
        batches.append(torch.cat(current))
    if n_neg:  # add the negatives: sampled with replacement, from the classes the batch holds
        neg_labels = labels[negatives]  # the source class of each near-OOD image
        for b, batch in enumerate(batches):
            pool = negatives[torch.isin(neg_labels, labels[batch])]  # near-OOD images of the classes in this batch
            pool = pool if len(pool) else negatives  # no match at all: any negative will do
            # (n_neg,) with replacement: negatives can be few
            pick = pool[torch.randint(len(pool), (n_neg,), generator=g)]
            batches[b] = torch.cat([batch, pick])  # (n_real + n_neg,) labelled first, then negatives
    return batches


class BatchImages(torch.utils.data.Dataset):
    """train.py --data-on host: item i is the uint8 images (b, C, H, W) of this process's share of
    batch i (for (T, 3) triplet batches, the a, p, n images of each triplet in turn). Indexed by
    a DataLoader with batch_size=None, so one worker gathers a whole batch in one indexing."""

    def __init__(self, images, batches, rank=0, world=1):
        # images (N, C, H, W) uint8 in host memory; batches: the epoch's index tensors
        self.images, self.batches, self.rank, self.world = images, batches, rank, world

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        share = self.batches[i].tensor_split(self.world)[self.rank]  # this rank's rows (torchrun)
        return self.images[share.flatten()]  # (b, C, H, W) uint8; (3T, C, H, W) for triplets


def _ignore_ctrl_c(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def host_batches(images, batches, first=0, rank=0, world=1, workers=2, pin_memory=False):
    """An iterator over the uint8 images of batches[first:], gathered from host memory by
    `workers` DataLoader processes (a few batches ahead) and, for a GPU, put in pinned memory so
    that .to(device, non_blocking=True) copies while the device still works on the step before.
    The path for training sets larger than the GPU's memory; the views are made on the device."""
    loader = torch.utils.data.DataLoader(
        BatchImages(images, batches, rank, world), sampler=range(first, len(batches)), batch_size=None,
        num_workers=workers, pin_memory=pin_memory, worker_init_fn=_ignore_ctrl_c,
        prefetch_factor=4 if workers else None,
        # the loader draws its workers' seeds from this generator, not from the global one that
        # dropout uses: a run with --data-on host draws the same numbers as one without
        generator=torch.Generator().manual_seed(0))
    return iter(loader)

# -----------------------------------------------------------------------------
# Batched augmentations on the training device (per-sample random parameters)


def to_float(images, mean, std):
    """uint8 (B, C, H, W) -> normalised float."""
    return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _affine(images, theta):
    """Resample (B, C, H, W) images through per-sample affine maps theta (B, 2, 3); zeros outside."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _uniform(n, low, high, g, device):
    """(n,) samples from U(low, high) drawn with generator g on device."""
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def augment_rotation(x, g, max_degrees=15.0, scale=(0.9, 1.1), shift=0.1):
    """The seed Siamese project's rotation augmentation: pad, rotate, scale (and a small shift)."""
    B, dev = x.shape[0], x.device
    # per-sample parameters, all (B,): angle in radians, zoom, shift (in units of half the image)
    angle = _uniform(B, -max_degrees, max_degrees, g, dev) * torch.pi / 180
    s = 1.0 / _uniform(B, *scale, g, dev)  # the sampling grid shrinks when the image grows
    tx, ty = _uniform(B, -shift, shift, g, dev), _uniform(B, -shift, shift, g, dev)
    # one affine map per sample; zeros padding is the "pad" of the seed project's rotation
    theta = torch.stack([torch.stack([s * angle.cos(), -s * angle.sin(), tx], 1),
                         torch.stack([s * angle.sin(), s * angle.cos(), ty], 1)], 1)  # (B, 2, 3)
    return _affine(x, theta)


@functools.lru_cache(maxsize=None)
def _hue_rotation_basis(device):
    """Hue rotation by angle a in RGB = T^-1 R(a) T, T = RGB -> YIQ, R(a) rotating the (I, Q)
    plane. R(a) = diag(1, 0, 0) + cos a diag(0, 1, 1) + sin a [[0,0,0],[0,0,-1],[0,1,0]], so the
    RGB matrix is keep + cos a * cos_part + sin a * sin_part with three constant (3, 3) matrices.
    Made once per device: no host-device copy (a synchronisation) in every training step."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
    from_yiq = torch.linalg.inv(to_yiq)
    parts = [torch.diag(torch.tensor([1.0, 0, 0], dtype=torch.float64)),
             torch.diag(torch.tensor([0, 1.0, 1.0], dtype=torch.float64)),
             torch.tensor([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], dtype=torch.float64)]
    return tuple((from_yiq @ r @ to_yiq).float().to(device) for r in parts)


def augment_simclr(x, g, strength=0.5, crop_scale=(0.2, 1.0), flip=True):
    """SimCLR's augmentations, batched: random resized crop, horizontal flip, colour jitter
    (0.8 s brightness/contrast/saturation, 0.2 s hue, with p 0.8), grayscale (p 0.2), Gaussian
    blur (p 0.5) for images of 64 px or more. x is in [0, 1], (B, C, H, W)."""
    B, C, H, W = x.shape
    dev = x.device  # every random number is drawn on the images' device (no host round trip)
    # ---- random resized crop (area in crop_scale, aspect ratio 3/4..4/3) + flip, one affine map
    area = _uniform(B, *crop_scale, g, dev)  # (B,) share of the image the crop covers
    log_ratio = _uniform(B, np.log(3 / 4), np.log(4 / 3), g, dev)  # (B,) log aspect ratio
    sw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sh = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    # crop centre, anywhere the crop still fits inside the image (normalised coordinates)
    cx, cy = (1 - sw) * _uniform(B, -1, 1, g, dev), (1 - sh) * _uniform(B, -1, 1, g, dev)
    sign = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    zero = torch.zeros(B, device=dev)
    # (B, 2, 3): output pixel -> input point; scaling by (sw, sh) picks the crop, sign flips it
    theta = torch.stack([torch.stack([sw * sign, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1)
    x = _affine(x, theta)  # (B, C, H, W): crop, resize back to H x W, flip, in one resampling
    # ---- colour jitter with probability 0.8 (each factor per sample)
    jitter = (torch.rand(B, 1, 1, 1, generator=g, device=dev) < 0.8).float()
    s = 0.8 * strength
    brightness = 1 + jitter * _uniform(B, -s, s, g, dev).view(B, 1, 1, 1)
    contrast = 1 + jitter * _uniform(B, -s, s, g, dev).view(B, 1, 1, 1)
    x = (x * brightness).clamp(0, 1)  # brightness: scale every pixel
    # (B, 1, H, W) luminance (ITU-R 601 weights, as torchvision's grayscale)
    grey = x.mean(1, keepdim=True) if C == 1 else (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    # contrast: blend with the image's mean grey level
    x = ((x - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)).clamp(0, 1)
    if C == 3:
        saturation = 1 + jitter * _uniform(B, -s, s, g, dev).view(B, 1, 1, 1)
        grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = ((x - grey) * saturation + grey).clamp(0, 1)  # saturation: blend with each pixel's grey
        # hue: rotate the chroma plane of YIQ by a random angle (up to 0.2 s of a full turn)
        angle = jitter.view(B) * _uniform(B, -0.2 * strength, 0.2 * strength, g, dev) * 2 * torch.pi
        keep, cos_part, sin_part = _hue_rotation_basis(dev)  # (3, 3) each, made once per device
        matrix = keep + angle.cos().view(B, 1, 1) * cos_part + angle.sin().view(B, 1, 1) * sin_part  # (B, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)
        # ---- random grayscale, p 0.2
        to_grey = torch.rand(B, 1, 1, 1, generator=g, device=dev) < 0.2
        grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = torch.where(to_grey, grey, x)
    # ---- Gaussian blur, p 0.5, sigma in [0.1, 2.0], kernel 10% of the image (large images only)
    if H >= 64:
        k = int(0.1 * H) // 2 * 2 + 1  # odd kernel size, about 10% of the side (SimCLR)
        sigma = _uniform(B, 0.1, 2.0, g, dev)  # (B,) blur strength per image
        # p 0.5: tiny sigma = no blur
        sigma = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, sigma, torch.full_like(sigma, 1e-3))
        t = torch.arange(k, device=dev, dtype=x.dtype) - k // 2  # (k,) offsets from the kernel centre
        kernel = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, k) one 1-D Gaussian per image
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
        y = x.reshape(1, B * C, H, W)  # every (image, channel) its own group: per-image kernels in one conv
        # horizontal pass
        y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=B * C)
        # vertical pass (separable)
        y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kernel[:, None, :, None], groups=B * C)
        x = y.reshape(B, C, H, W)
    return x


def augment(images, how, g, mean, std):
    """uint8 (B, C, H, W) on any device -> one augmented, normalised float view (B, C, H, W)."""
    x = images.float() / 255.0  # (B, C, H, W) in [0, 1]
    if how == "rotation":
        x = augment_rotation(x, g)
    elif how == "simclr":
        x = augment_simclr(x, g)
    elif how != "none":
        raise ValueError(f"--augment must be none, rotation or simclr; got {how!r}")
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # normalised with the real images' statistics


def channel_stats(images):
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float() / 255.0
    return x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp(min=1e-3)  # (C,), (C,); clamp: a constant channel


def atomic_write_text(text, path):
    """Write text to a temporary name beside `path`, then rename: a reader (or a crash) never
    sees half a file. Used for every config, metrics, report and results file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Several processes (torchrun): which share of the work is this process's


def init_distributed(device):
    """Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1 in the environment): join the process
    group -- NCCL on CUDA, gloo on CPU -- and return this process's device (cuda:LOCAL_RANK);
    processes other than rank 0 print nothing from then on (rank 0 alone logs). In a plain
    `python` run it changes nothing and returns device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not under torchrun: one process
        return device
    if device.type == "cuda":  # one GPU per process, the one torchrun assigned
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # NCCL between GPUs, gloo between CPU processes (the CI test)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if torch.distributed.get_rank() > 0:  # rank 0 alone prints
            sys.stdout = open(os.devnull, "w")
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


def add_data_arguments(parser):
    """The data options, shared by train.py, data.py and dafusion.py."""
    d = parser.add_argument_group("data")
    d.add_argument("--data", default="digits",
                   help="digits (default, bundled with scikit-learn), mnist, fashion-mnist, cifar10, "
                        "or PATH to an image folder (PATH/train + PATH/test, or PATH/<class>/)")
    d.add_argument("--data-root", default="./.data", help="where torchvision data sets live")
    d.add_argument("--download", action="store_true", help="allow torchvision to download the data set")
    d.add_argument("--image-size", type=int, default=None,
                   help="side in pixels (default: native; digits 16, MNIST 28, CIFAR 32, folders 32)")
    d.add_argument("--resize", choices=["crop", "letterbox"], default="crop",
                   help="folders: centre-crop the short side, or letterbox (keep aspect, black canvas)")
    d.add_argument("--val-fraction", type=float, default=0.25,
                   help="test share when a source has no test split (digits, single folder)")
    d.add_argument("--examples-per-class", type=int, default=None,
                   help="few-shot: keep K training images per class (seeded)")
    d.add_argument("--ood-classes", default=None,
                   help="classes held out of training; their test images are the near-OOD test set "
                        "(names or indices, comma-separated; default for digits: 8,9; '' for none)")
    d.add_argument("--masks", default=None,
                   help="folder of object masks (same relative paths, .png): crop a square around each "
                        "dilated mask (the thesis's preprocessing)")
    d.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (counted)")
    d.add_argument("--seed", type=int, default=0, help="seed of splits, sampling, augmentation, init")
    return parser


def splits_from_args(args):
    """load_data with the data arguments of add_data_arguments."""
    return load_data(args.data, args.data_root, args.download, args.image_size, args.val_fraction,
                     args.seed, args.examples_per_class, args.ood_classes, args.resize,
                     args.skip_bad_images, args.masks)


if __name__ == "__main__":
    parser = add_data_arguments(argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--augment", default="rotation", choices=["none", "rotation", "simclr"])
    args = parser.parse_args()
    splits = splits_from_args(args)
    print(f"classes {splits.classes}; held out as OOD: {splits.ood_classes or 'none'}")
    print(f"train {tuple(splits.train.images.shape)}  test {tuple(splits.test.images.shape)}  "
          f"ood test {tuple(splits.ood_test.images.shape) if splits.ood_test else None}")
    import torchvision
    g = torch.Generator().manual_seed(args.seed)
    imgs = splits.train.images[:8]
    views = [imgs.float() / 255] + [augment(imgs, args.augment, g, torch.zeros(1), torch.ones(1)).clamp(0, 1)
                                    for _ in range(3)]
    torchvision.utils.save_image(torch.cat(views), "data_preview.png", nrow=8)
    print("wrote data_preview.png (rows: original, then three augmented views)")
