"""
benchmarks/negatives_study.py -- The negatives study: do real near-OOD negatives help, used in
each of the ways the literature uses them (train.py --negative-mode), in a regime that CAN learn?

Why a new regime. The sweep and the positive control (near_ood_sweep.py, positive_control.py)
trained a small CNN 300 steps on 7 x 50 CIFAR-10 images: test accuracy about 0.46, k-NN OOD
AUROC about 0.62. An encoder that weak cannot show what a negative does to an embedding. Here:
Fashion-MNIST, 7 classes of 200 training images, the same small CNN at 28 px, 600 steps of 128
images: a run of about 1-2.5 minutes on one core. REGIME below was measured, not assumed
(benchmarks/results/negatives_study_regime.md): real only reaches test accuracy 0.945-0.949
(bar: 0.85) and a primary AUROC of 0.855-0.883 over 6 runs (bar: between 0.70 and 0.92, room
both ways). With all 6,000 images a class the AUROC was 0.886-0.930 (one seed over 0.92) and an
evaluation on 42,000 reference images costs more; with 50 a class (the thesis's few-shot
situation, reported beside it) the accuracy stays at 0.92 but the k = 50 AUROC falls to
0.66-0.78. Runs use one thread each, two at a time: two-thread runs slowed 5-6 times whenever
other work shared the 2 cores (OpenMP threads waiting on each other).

Data (prepare(): from the IDX files of Debian's dataset-fashion-mnist, no download)
  ID        T-shirt/top, Trouser, Dress, Sandal, Sneaker, Bag, Ankle boot: 200 training images
            a class drawn by the seed (train.py --examples-per-class, from 6,000), every test
            image (1,000 a class).
  Test OOD  Shirt and Pullover, their 2,000 test images: the near-OOD classes (tops, like the
            ID T-shirts) no run ever trains on and phase 1 never reads.
  Negatives Coat: its 6,000 training images as PNG in one flat folder (--negative-data: a
            negative of every anchor), less any image that equals, pixel for pixel, an image of
            either design (train.py would refuse the folder). Coats are the sibling of shirts
            and pullovers (long-sleeved tops) that a user could collect: real near-OOD images,
            the strong baseline of the literature (outlier exposure, Hendrycks et al. 2019).
  How the classes leave. torchvision's FashionMNIST has a fixed list of 10 classes, and
            data.load_data makes every class not in --ood-classes a training class and puts the
            test images of every held-out class in the OOD test set. A run given the original
            files with --ood-classes Shirt,Pullover,Coat would score coat's test images as OOD
            test images too -- the very class its negatives come from. So each design gets its
            own IDX files (<data>/<design>/FashionMNIST/raw/, read by train.py --data
            fashion-mnist --data-root <data>/<design>) holding only the images it may read;
            every class outside ID is passed to --ood-classes and the absent ones are empty. The
            run's own metrics.json then holds the study's numbers, every score of every arm
            (ood_auroc_knn, ood_auroc_knn_neg, ood_auroc_head, ood_auroc_msp), exactly on
            shirt + pullover.
  Validation (phase 1; settings must not be chosen on shirt or pullover). Options weighed:
            held-out coat images -- biased: they measure rejecting the negatives' own class,
            which any arm that memorises coats wins, not the transfer to unseen classes the
            test asks for; far-OOD digits (MNIST, KMNIST) -- every arm scores near 1 on them,
            and a far-OOD set selects for far-OOD behaviour; shirt/pullover training images --
            the test classes. Chosen: a proxy split with the test's structure, built from the
            TRAINING split alone: T-shirt/top held out as the validation OOD class (a top, a
            sibling of the coat negatives, as shirt and pullover are), the other 6 ID classes
            as ID, 1,000 training images per class kept out of training as the validation ID
            and OOD images. It reads no test image and no shirt or pullover at all. What it
            cannot promise: that a setting best for T-shirt against 6 classes is best for
            shirt + pullover against 7 (hence phase 2 tests only the chosen setting, against
            its control, on fresh seeds).

Primary metric: the run's metrics.json ood_auroc_knn, Sun et al. 2022's k-NN score with k = 50
on the N = 1,400 real training images, of shirt + pullover's 2,000 test images against the 7,000
ID test images. One k for every arm, k = 50, because: it is evaluate.py's headline, so every
arm's figure is its run's own metrics.json, measured once by the code under test; (b)'s
k-NN+neg is the same k-NN term plus a negatives term at the same share of the M = 6,000
negatives (k' = round(k M / N) = 214, evaluate.negatives_k); and at k/N = 3.6% (a quarter of a
class's 200 images) it scores the distance to a class's bulk, not to one image. Sun et al.'s
own ratio (50 of CIFAR-10's 50,000) would give k = 1-2 here, i.e. k = 1 (ood_auroc_knn1, kept
as a secondary figure), the score one stray training image can move. The sweep's k = 5 (of 350)
was the same trade at its size. In the few-shot regime (350 images) k = 50 is 14% of the
references, a whole class's quantile; phase 2 keeps k = 50 there too, so that both regimes and
every arm are scored alike (k = 1 is reported beside it, descriptive only).

Arms (train.py flags; NEG = the coat folder), each against its control, same seed:
  (a) control / (a)         --negative-data NEG --negative-weight 0 / w: the thesis's negatives
                            in the SupCon denominators. At w = 0 the encoder is exactly real
                            only's (tests/test_batch_stats.py), so (a)'s control is real only.
  (b)                       k-NN+neg (ood_auroc_knn_neg, SSD_k's few-shot score with k-NN
                            distances) minus k-NN, within (a) control's run: the same encoder,
                            the negatives at the score only (--negative-mode score trains
                            exactly this encoder)
  outlier exposure          (a) control's probe trained with --outlier-exposure 0.5
                            (Hendrycks et al. 2019): its ood_auroc_msp, the baseline to beat.
                            It is outlier exposure on a linear probe over a frozen encoder, a
                            weaker baseline than the paper's fine-tuning of the whole network;
                            (c) is the nearer to that.
  (c) control / (c)         --negative-mode head --head-loss oe --head-weight 0 / lambda: an
                            outlier-exposure head trained with the encoder; ood_auroc_head
  (d) control / (d)         --negative-mode prototypes --prototype-weight 0 / lambda,
                            --prototype-momentum alpha
  (e) classes               --negative-mode classes: the negatives a class of their own (CSI's
                            sup-CSI), against (a) control (the same batches, negatives at w = 0)

PHASE 1 (exploratory, this script's `phase1`): on the validation design, seeds PHASE1_SEEDS,
each setting of PHASE1_GRID against its control on the validation ood_auroc_knn; an arm keeps
its literature default unless another setting's mean paired gain over the control beats the
default's by more than one standard error of their paired difference (near_ood_sweep's rule).
Two more rows, control + OE and (e), choose nothing: with the others they give the paired sd of
each of phase 2's ten contrasts (phase1_spread), from which SEEDS_RULE sets phase 2's seed count.
Its numbers choose settings and seeds and nothing else: no claim rests on them.
PHASE 2 (confirmatory), FROZEN HERE before any phase-2 run, at f374158. Phase 2 first started
there; a reader's review then found bugs in this script's checks and analysis (not in the design
below) and in evaluate.py's band filter, so the runs made at f374158 were discarded unseen (no
metric was printed) and phase 2 restarted at the commit that adds this sentence:
  Regimes   competent: REGIME, 200 training images a class; few-shot: 50 a class (the thesis's
            situation), all else the same. Both on the test design: shirt + pullover's 2,000
            test images against the 7,000 ID test images, coat's 6,000 as the negatives.
  Seeds     PHASE2_SEEDS: 24 fresh seeds, 1000-1023 (no run has used them). SEEDS_RULE
            (phase2_seed_count): the fewest seeds whose 95% t-interval is +-0.01 at the largest
            of phase 1's ten paired sds, at least 10, at most 24 (the budget: 336 runs of about
            55 s each, two at a time, 5.1 hours, and the synthetic row's 0.6). Phase 1's sds
            (validation design) are 0.016-0.100, the largest (d) vs its control: the rule says
            24, and at those sds 24 seeds give half-widths of +-0.007 to +-0.042 (0.42 sd). The
            test design's real-only AUROC spreads 8 times less than the validation design's
            (sd 0.010 against 0.08), so its intervals should be narrower; what they are is
            reported, not assumed.
  Rows      PHASE2_ROWS, 7 runs a seed and regime, one thread each, two at a time:
              control + OE  (a)'s control (negatives at w = 0, which leaves the encoder exactly
                            as without them) with its probe trained with outlier exposure
                            (lambda 0.5). Its run holds three figures: the controls' k-NN,
                            (b)'s k-NN+neg, and outlier exposure's MSP on the frozen probe.
              (a)           w = 4 (phase 1's choice over 0.25 and 1)
              (c) control, (c)  --head-weight 0 and 0.5 (the default: 0.1 and 1 did not beat
                            it by a standard error on phase 1's k-NN, the metric its rule
                            fixed; on the head's own MSP, 1 would have: noted, not followed)
              (d) control, (d)  --prototype-weight 0 and 1, --prototype-momentum 0.99 (phase
                            1's choice over 0.9 and 0.95 at weight 1, and 0.5 and 2 at 0.95)
              (e)           --negative-mode classes
  Primary   the near-OOD AUROC of each arm's own score, its control scored the same way:
              (a) k-NN (k = 50) of (a)         minus that of control + OE
              (b) k-NN+neg of control + OE     minus its k-NN (the same run)
              (c) the head's MSP of (c)        minus that of (c) control
              (d) k-NN of (d)                  minus that of (d) control
              (e) k-NN of (e)                  minus that of control + OE
            and each arm's primary figure minus outlier exposure's MSP AUROC (control + OE's
            frozen probe): ten contrasts a regime.
  Statistics  paired over seeds: the mean difference, its 95% t-interval, a two-sided paired
            t-test; Holm at 0.05 within each regime's ten (near_ood_sweep.holm). Secondary,
            intervals without tests: the k-NN AUROC and the test accuracy of (a), (c), (d) and
            (e) against their controls.
  Winner    an arm wins a regime when both its contrasts are positive after Holm. It becomes
            what --negative-data and --negatives near_ood do by default if it wins the
            competent regime and neither of its few-shot contrasts is negative after Holm (two
            such arms: the larger mean gain over outlier exposure). The thesis's mechanism
            stays available as --negative-mode denominators.
  A null    an interval that holds 0 says no effect as large as its half-width was found at
            this many seeds; it is not evidence of no effect. If no arm wins, the negatives go
            where they cannot harm the encoder: the default becomes --negative-mode score (the
            encoder trains as without them; the k-NN+neg score uses them) with the probe trained
            by outlier exposure on them, and the README names, with its interval, which of
            outlier exposure's MSP, k-NN and k-NN+neg scored highest in the competent regime.
  Synthetic the synthetic row (`synthetic`, after the look), on SYN_SEEDS (1000-1007) of the
            competent regime: the best arm (the largest mean gain over its control in the
            competent regime; a choice, not a test, and the arms' gains are on their own
            scores, not one scale) and its control, with --negative-data
            the ddpm's near-OOD images that the band filter keeps: dafusion.py on the seed's
            1,400 training images (--kinds near_ood --strengths 0.5,0.7,0.9 --per-image 1:
            4,200 images), then evaluate.py --nearness --band-of the coats, the seed's control
            + OE run as the meter's reference (the coats' 5%-95% band of k-NN scores).
            Reported: the counts kept at each strength, and the arm against its control
            (interval; secondary, no Holm). If none survives, the counts say so and nothing is
            trained.
  One look  `phase2` prints counts, never a metric; `analyse` refuses until every run is in
            the ledger (results/negatives_study_phase2_runs.json, rewritten after each run, so
            a stopped study resumes; the runs must all come from one commit of the product's
            files, PRODUCT). Then it computes all of the above once.

Run:  python benchmarks/negatives_study.py prepare        # the data (seconds)
      python benchmarks/negatives_study.py regime --workers 2      # real only, seeds 0 1 2
      python benchmarks/negatives_study.py regime --shots 50       # the few-shot row
      python benchmarks/negatives_study.py regime --design validation
      python benchmarks/negatives_study.py phase1    # 48 runs, 2 at a time: about 45 minutes
      python benchmarks/negatives_study.py phase1 --smoke --seeds 100   # 2 steps a run
      python benchmarks/negatives_study.py phase2    # the frozen design (resumes)
      python benchmarks/negatives_study.py analyse   # the one look, once every run is in
      python benchmarks/negatives_study.py synthetic # the synthetic row, after the look:
                  # results/negatives_study_synthetic.{json,md}; once all its seeds are in,
                  # it only writes the report, on any commit
      python benchmarks/negatives_study.py phase2 --smoke --seeds 9000 9001 --out /tmp/s  # test
Runs go to runs/negatives_study/ (finished runs are reused); data to .data/fmnist-study.
Product code: the rows type no --negative-mode for (a) because denominators was train.py's
default where they ran (6445f3a). After the study, a run with negatives defaults to score, and
train.py refuses those rows' --negative-weight; phase2 and synthetic refuse to run anywhere the
product's files differ from phase 2's (product_commit). Run the script (smoke runs too) in a
worktree at a commit whose product files equal 6445f3a's: git worktree add DIR fb57657.
Needs /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist) or --source.
"""

import argparse
import gzip
import importlib.metadata
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import data  # noqa: E402

# -----------------------------------------------------------------------------
# The design's constants

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]  # torchvision's FashionMNIST.classes: label i is CLASSES[i]
ID = ["T-shirt/top", "Trouser", "Dress", "Sandal", "Sneaker", "Bag", "Ankle boot"]
TEST_OOD, NEGATIVE = ["Shirt", "Pullover"], "Coat"
VAL_OOD = "T-shirt/top"  # phase 1's held-out class (see the docstring's Validation)
VAL_PER_CLASS = 1000  # validation images per class, from the training split
SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}
# the regime, measured in results/negatives_study_regime.md (every run of the study has it)
REGIME = {"shots": 200, "model": "cnn", "image_size": 28, "batch_size": 128, "train_steps": 600,
          "warmup_steps": 30, "linear_epochs": 100, "temperature": 0.1, "augment": "auto"}
THREADS = 1  # torch threads per run; runs go 2 at a time (the docstring says why)
PRIMARY = "ood_auroc_knn"  # k-NN, k = 50 (docstring)
PHASE1_SEEDS = [100, 101, 102]  # not phase 2's: its seeds must be fresh

NEG = "{negatives}"  # stands for the coat folder in the flags below
REAL, CONTROL_A, CONTROL_C, CONTROL_D = ("real only", "(a) control", "(c) control",
                                         "(d) control")
CONTROL_OE = "control + OE"  # (a)'s control, its probe trained with outlier exposure
OE = ["--outlier-exposure", "0.5"]  # Hendrycks et al. 2019's lambda for vision
ARMS = {  # row: train.py flags at the literature's settings (phase 2: PHASE2_ROWS)
    REAL: [],
    CONTROL_A: ["--negative-data", NEG, "--negative-weight", "0"],
    "(a) denominators": ["--negative-data", NEG, "--negative-weight", "1"],
    CONTROL_C: ["--negative-data", NEG, "--negative-mode", "head", "--head-loss", "oe",
                "--head-weight", "0"],
    "(c) head": ["--negative-data", NEG, "--negative-mode", "head", "--head-loss", "oe",
                 "--head-weight", "0.5"],
    CONTROL_D: ["--negative-data", NEG, "--negative-mode", "prototypes",
                "--prototype-weight", "0", "--prototype-momentum", "0.95"],
    "(d) prototypes": ["--negative-data", NEG, "--negative-mode", "prototypes",
                       "--prototype-weight", "1", "--prototype-momentum", "0.95"],
    "(e) classes": ["--negative-data", NEG, "--negative-mode", "classes"],
}
# phase 1: arm -> (its control, {setting: flags}, the literature's default setting)
PHASE1_GRID = {
    "(a)": (CONTROL_A, {f"w={w}": ["--negative-data", NEG, "--negative-weight", w]
                        for w in ("0.25", "1", "4")}, "w=1"),
    "(c)": (CONTROL_C, {f"lambda={x}": ["--negative-data", NEG, "--negative-mode", "head",
                                        "--head-loss", "oe", "--head-weight", x]
                        for x in ("0.1", "0.5", "1")}, "lambda=0.5"),
    "(d)": (CONTROL_D, {f"alpha={a}, lambda={x}": [
        "--negative-data", NEG, "--negative-mode", "prototypes", "--prototype-momentum", a,
        "--prototype-weight", x] for a, x in (("0.9", "1"), ("0.95", "1"), ("0.99", "1"),
                                              ("0.95", "0.5"), ("0.95", "2"))},
        "alpha=0.95, lambda=1"),
}

# phase 2 (frozen: the docstring's PHASE 2). Settings from phase 1 (results/negatives_study_
# phase1.json); the seeds are fresh.
A_W, C_LAMBDA, D_ALPHA, D_LAMBDA = "4", "0.5", "0.99", "1"  # phase 1's choices
N_SEEDS = 24  # SEEDS_RULE on phase 1's spread (results/negatives_study_phase1.json)
PHASE2_SEEDS = list(range(1000, 1000 + N_SEEDS))
REGIMES = {"competent": {"shots": 200}, "few-shot": {"shots": 50}}  # run_arm's regime_of
PHASE2_ROWS = {
    CONTROL_OE: ARMS[CONTROL_A] + OE,  # (a)'s control; its run also holds (b) and OE
    "(a) denominators": ["--negative-data", NEG, "--negative-weight", A_W],
    CONTROL_C: ARMS[CONTROL_C],
    "(c) head": ["--negative-data", NEG, "--negative-mode", "head", "--head-loss", "oe",
                 "--head-weight", C_LAMBDA],
    CONTROL_D: ["--negative-data", NEG, "--negative-mode", "prototypes", "--prototype-weight",
                "0", "--prototype-momentum", D_ALPHA],
    "(d) prototypes": ["--negative-data", NEG, "--negative-mode", "prototypes",
                       "--prototype-weight", D_LAMBDA, "--prototype-momentum", D_ALPHA],
    "(e) classes": ARMS["(e) classes"],
}
PRIMARY_OF = {  # arm: ((row, its own score), (its control's row, the same score))
    "(a)": (("(a) denominators", PRIMARY), (CONTROL_OE, PRIMARY)),
    "(b)": ((CONTROL_OE, "ood_auroc_knn_neg"), (CONTROL_OE, PRIMARY)),
    "(c)": (("(c) head", "ood_auroc_head"), (CONTROL_C, "ood_auroc_head")),
    "(d)": (("(d) prototypes", PRIMARY), (CONTROL_D, PRIMARY)),
    "(e)": (("(e) classes", PRIMARY), (CONTROL_OE, PRIMARY)),
}
OE_SCORE = (CONTROL_OE, "ood_auroc_msp")  # outlier exposure on the frozen probe
SECONDARY = [("(a) denominators", CONTROL_OE), ("(c) head", CONTROL_C),
             ("(d) prototypes", CONTROL_D), ("(e) classes", CONTROL_OE)]  # k-NN, accuracy
METRICS_OF = {row: [PRIMARY, "ood_auroc_msp", "test_accuracy"]
              + (["ood_auroc_knn_neg"] if row == CONTROL_OE else [])
              + (["ood_auroc_head"] if row in (CONTROL_C, "(c) head") else [])
              for row in PHASE2_ROWS}
KEPT = ["test_accuracy", "knn_accuracy", "ood_auroc_knn", "ood_auroc_knn1", "ood_auroc_msp",
        "ood_auroc_knn_neg", "ood_auroc_head", "head_test_accuracy", "train_minutes",
        "wall_seconds", "threads", "run_dir"]  # what the ledger keeps of each run
LEDGER = os.path.join(HERE, "results", "negatives_study_phase2_runs.json")
SYN_STRENGTHS = "0.5,0.7,0.9"  # the ddpm's near-OOD strengths the band filter chooses among
SYN_SEEDS = PHASE2_SEEDS[:8]  # the synthetic row's seeds: the first 8 of phase 2's
SYN_LEDGER = os.path.join(HERE, "results", "negatives_study_synthetic.json")
CAVEATS = [  # written under every analysis, whatever it finds
    "Outlier exposure here trains the linear probe on a frozen encoder; Hendrycks et al. (2019) "
    "fine-tune the whole network, a stronger baseline. (c) trains its head with the encoder.",
    "Coats, shirts and pullovers are Fashion-MNIST's most confused classes: these negatives are "
    "unusually near the test OOD classes, and a gain with them need not carry to negatives that "
    "are less near (the synthetic row asks that of the ddpm's images).",
    "One data set, one encoder (the small CNN, 600 steps), one k (50). The arms' own scores "
    "differ (k-NN, k-NN+neg, the head's MSP), so their gains over their controls are not on one "
    "scale; outlier exposure's MSP is the one yardstick all five are compared with.",
    "Phase 1's validation design spread far wider than this test design; the intervals above "
    "are what the test design gave, at the seed count phase 1's spread set."]
PRODUCT = ["supcon.py", "data.py", "dafusion.py", "train.py", "evaluate.py", "requirements.txt"]


# -----------------------------------------------------------------------------
# Data: the IDX files of each design, and the coat negatives


def read_idx(path):
    """An IDX file (plain or .gz) -> uint8 array (N,) labels or (N, 28, 28) images."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes, the only type Fashion-MNIST has
        raise data.DataError(f"{path}: not an IDX file of unsigned bytes (magic {magic:#x})")
    dims = struct.unpack(f">{magic & 0xFF}I", raw[4:4 + 4 * (magic & 0xFF)])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims))
    if body.size != int(np.prod(dims)):
        raise data.DataError(f"{path}: holds {body.size} bytes, its header says "
                             f"{int(np.prod(dims))} (a truncated file?)")
    return body.reshape(dims)


def write_idx(path, array):
    """array (uint8) -> an IDX file torchvision's MNIST reader takes, written atomically."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())
    data.atomic_write(path, write)


def read_source(source):
    """{split: (images (N, 28, 28), labels (N,))} of the original Fashion-MNIST."""
    out = {}
    for split, (images, labels, n) in IDX.items():
        found = []
        for name in (images, labels):
            path = next((os.path.join(source, name + ext) for ext in (".gz", "")
                         if os.path.exists(os.path.join(source, name + ext))), None)
            if path is None:
                raise data.DataError(f"{source}: no {name}(.gz). Install it with `apt-get "
                                     f"install dataset-fashion-mnist`, or pass --source DIR")
            found.append(read_idx(path))
        if len(found[0]) != n or len(found[1]) != n:
            raise data.DataError(f"{source}: {split} has {len(found[0])} images and "
                                 f"{len(found[1])} labels, not {n} of each")
        out[split] = tuple(found)
    return out


def design_sets(source):
    """{design: {split: (images, labels)}}: what each design's runs may read (docstring)."""
    index = lambda names: [CLASSES.index(c) for c in names]  # noqa: E731
    (x, y), (x_test, y_test) = source["train"], source["test"]
    pick = lambda xs, ys, keep: (xs[keep], ys[keep])  # noqa: E731
    test = {"train": pick(x, y, np.isin(y, index(ID))),
            "test": pick(x_test, y_test, np.isin(y_test, index(ID + TEST_OOD)))}
    rng = np.random.default_rng(12345)  # the validation images: one fixed draw
    held = np.zeros(len(y), bool)
    for c in index(ID):  # the 6 validation ID classes and T-shirt, the validation OOD class
        held[rng.permutation(np.flatnonzero(y == c))[:VAL_PER_CLASS]] = True
    val_id = index([c for c in ID if c != VAL_OOD])
    validation = {"train": pick(x, y, np.isin(y, val_id) & ~held), "test": pick(x, y, held)}
    return {"test": test, "validation": validation}


def ood_flag(design):
    """--ood-classes of a design: every class outside its ID (the absent ones are empty)."""
    kept = ID if design == "test" else [c for c in ID if c != VAL_OOD]
    return ",".join(c for c in CLASSES if c not in kept)


def prepare(args):
    """<data>/test, <data>/validation (torchvision layouts) and <data>/coat (PNG), made once; a
    'done' file, written last, lists what they hold."""
    done = os.path.join(args.data, "done.json")
    if os.path.exists(done):
        return args.data
    source = read_source(args.source)
    sets = design_sets(source)
    known = {image.tobytes() for design in sets.values() for images, _ in design.values()
             for image in images}  # every image a run may read: a negative must be none of them
    for design, splits in sets.items():
        raw = os.path.join(args.data, design, "FashionMNIST", "raw")
        for split, (images, labels) in splits.items():
            write_idx(os.path.join(raw, IDX[split][0]), images)
            write_idx(os.path.join(raw, IDX[split][1]), labels)
    x, y = source["train"]
    coats = np.flatnonzero(y == CLASSES.index(NEGATIVE))
    kept = [i for i in coats if x[i].tobytes() not in known]
    folder = os.path.join(args.data, "coat")
    os.makedirs(folder, exist_ok=True)
    from PIL import Image
    for i in kept:  # named by the training index: which image it is stays traceable
        path = os.path.join(folder, f"train-{i:05d}.png")
        if not os.path.exists(path):
            data.atomic_write(path, Image.fromarray(x[i]).save)
    summary = {"source": os.path.abspath(args.source), "negatives": len(kept),
               "negatives_dropped_as_duplicates": len(coats) - len(kept),
               **{f"{d}_{s}": len(v[1]) for d, splits in sets.items() for s, v in splits.items()}}
    data.write_text(done, json.dumps(summary, indent=1))
    print(f"prepared {args.data}: {summary}")
    return args.data


# -----------------------------------------------------------------------------
# One run of one arm


def regime_of(args):
    """REGIME with the regime command's overrides (--shots, --train-steps, --batch-size,
    --image-size, --temperature, --augment); --shots 0: every training image."""
    keys = ("shots", "train_steps", "batch_size", "image_size", "temperature", "augment")
    return REGIME | {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def train_argv(args, design, flags, seed, out, name):
    """train.py's arguments: the design's data, the regime, the arm's flags."""
    r = regime_of(args)
    shots = ["--examples-per-class", str(r["shots"])] if r["shots"] else []
    flags = [os.path.join(args.data, "coat") if f == NEG else f for f in flags]
    return ["--data", "fashion-mnist", "--data-root", os.path.join(args.data, design),
            "--ood-classes", ood_flag(design), "--seed", str(seed), *shots,
            "--model", r["model"], "--image-size", str(r["image_size"]), "--loss", "supcon",
            "--temperature", str(r["temperature"]), "--augment", r["augment"],
            "--batch-size", str(r["batch_size"]),
            "--train-steps", str(r["train_steps"]), "--warmup-steps",
            str(r["warmup_steps"] if not args.train_steps else args.train_steps // 20),
            "--linear-epochs", str(1 if args.smoke else r["linear_epochs"]), "--device", "cpu",
            "--no-report", "--out", out, "--name", name, *flags]


def run_arm(args, design, row, flags, seed, threads):
    """One train.py run in its own process (`threads` torch threads), reused when it finished
    before; returns its metrics.json with the run's wall time and folder added."""
    r = regime_of(args)
    tag = f"b{r['batch_size']}-s{r['train_steps']}" + "".join(
        f"-{key}{r[key]}" for key in ("image_size", "temperature", "augment")
        if r[key] != REGIME[key])  # a setting other than the regime's: another folder
    tag += (f"-shots{r['shots']}" if r["shots"] else "") + f"-t{threads}"  # threads: rounding
    out = os.path.join(args.out, design + ("-smoke" if args.smoke else ""), tag)
    name = "".join(ch for ch in f"{row}-seed{seed}".replace(" ", "_")
                   if ch.isalnum() or ch in "_.-+,=()")
    run_dir = os.path.join(out, name)
    argv = train_argv(args, design, flags, seed, out, name)
    if os.path.exists(os.path.join(run_dir, "wall_seconds.txt")):  # written last: finished
        same_run(run_dir, argv)  # reused only if it is this row's run
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped half-way starts again
        os.makedirs(out, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t0 = time.time()
        with open(os.path.join(out, name + ".log"), "w", encoding="utf-8") as log:
            done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"{row}, seed {seed}: train.py failed; see {log.name}")
        data.write_text(os.path.join(run_dir, "wall_seconds.txt"),
                        f"{time.time() - t0:.1f} {threads}\n")
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "wall_seconds.txt"), encoding="utf-8") as f:
        wall, threads = f.read().split()
    return metrics | {"wall_seconds": float(wall), "threads": int(threads), "run_dir": run_dir}


def same_run(run_dir, argv):
    """SystemExit unless run_dir's config.json holds the settings train.py's `argv` gives: a
    finished run is reused only for the row, seed and regime that made it. Data folders are
    compared by their last two names (another worktree moves them, not what they hold)."""
    import train  # its parser turns argv into the settings config.json records
    parser = train.build_parser()
    given = data.given_options(parser, argv)  # the settings argv types (the rest are defaults)
    want = {k: v for k, v in vars(parser.parse_args(argv)).items() if k in given}
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        have = json.load(f)
    tail = lambda p: "/".join(os.path.normpath(p).split(os.sep)[-2:]) if p else p  # noqa: E731
    for key, value in want.items():
        if key in ("out", "name", "device") or key not in have:
            continue
        mine, theirs = (tail(value), tail(have[key])) if key in ("data_root", "negative_data") \
            else (json.loads(json.dumps(value)), have[key])
        if mine != theirs:
            raise SystemExit(f"{run_dir}: made with {key} = {have[key]!r}, not {value!r}; move "
                             f"it away to run this row again")


# -----------------------------------------------------------------------------
# The regime measurement and phase 1


def regime(args):
    """Real only on args.seeds, --workers runs at a time (default 1) with --threads threads
    each: the table of results/negatives_study_regime.md."""
    from concurrent.futures import ThreadPoolExecutor  # each run is its own process
    with ThreadPoolExecutor(args.workers or 1) as pool:
        jobs = {seed: pool.submit(run_arm, args, args.design, REAL, ARMS[REAL], seed,
                                  args.threads) for seed in args.seeds}
        results = {seed: job.result() for seed, job in jobs.items()}
    r = regime_of(args)
    print(f"| design | shots | px | batch | steps | threads | at a time | seed | test accuracy | "
          f"k-NN AUROC (k=50) | k-NN AUROC (k=1) | MSP AUROC | training min | wall s |\n"
          + "|---" * 14 + "|")
    for seed, m in results.items():
        print(f"| {args.design} | {r['shots'] or 'all'} | {r['image_size']} | "
              f"{r['batch_size']} | {r['train_steps']} | {m['threads']} | "
              f"{args.workers or 1} | {seed} | {m['test_accuracy']:.4f} | "
              f"{m['ood_auroc_knn']:.4f} | {m['ood_auroc_knn1']:.4f} | {m['ood_auroc_msp']:.4f} | "
              f"{m['train_minutes']:.2f} | {m['wall_seconds']:.0f} |", flush=True)


def phase1_rows():
    """{row: flags}: every control and every setting of PHASE1_GRID, and the rows that only
    measure phase 2's spread: the control with outlier exposure's probe, and (e)."""
    rows = {control: ARMS[control] for control, _, _ in PHASE1_GRID.values()}
    for arm, (_, settings, _) in PHASE1_GRID.items():
        rows.update({f"{arm} {s}": flags for s, flags in settings.items()})
    return rows | {CONTROL_OE: ARMS[CONTROL_A] + OE, "(e) classes": ARMS["(e) classes"]}


def choose(results):
    """{arm: (chosen setting, its gains)}: the default unless the best setting's mean paired gain
    over the control beats the default's by more than one standard error (near_ood_sweep's
    rule), on the validation PRIMARY."""
    import near_ood_sweep as sweep  # the paired statistics
    out = {}
    for arm, (control, settings, default) in PHASE1_GRID.items():
        gains = {s: sweep.paired(results, [f"{arm} {s}"], control, PRIMARY)[0] for s in settings}
        top = max(settings, key=lambda s: gains[s]["mean_delta"])
        if top != default:
            d = sweep.paired(results, [f"{arm} {top}"], f"{arm} {default}", PRIMARY)[0]
            if not d["mean_delta"] > d["sd_delta"] / d["n"] ** 0.5:
                top = default
        out[arm] = (top, gains)
    return out


def phase1_spread(results, chosen, seeds):
    """{contrast: paired sd over phase 1's seeds}: phase 2's ten contrasts on the validation
    design, each arm at its chosen setting (phase 1's rows stand for PHASE2_ROWS)."""
    as_row = {CONTROL_OE: CONTROL_OE, CONTROL_C: CONTROL_C, CONTROL_D: CONTROL_D,
              "(e) classes": "(e) classes", **{f"({a}) " + {"a": "denominators", "c": "head",
                                                              "d": "prototypes"}[a]:
                                               f"({a}) {chosen[f'({a})']}" for a in "acd"}}
    out = {}
    for a, (arm, control) in PRIMARY_OF.items():
        for name, base in ((f"{a} vs its control", control), (f"{a} vs outlier exposure",
                                                             OE_SCORE)):
            d = [results[as_row[arm[0]]][s][arm[1]] - results[as_row[base[0]]][s][base[1]]
                 for s in seeds]
            out[name] = float(np.std(d, ddof=1))
    return out


def phase2_seed_count(spread):
    """SEEDS_RULE: the fewest seeds whose 95% t-interval is +-0.01 at the largest of phase 1's
    paired sds, at least 10, at most 24 (what fits about 5 hours; the docstring's budget)."""
    import near_ood_sweep as sweep  # seeds_for
    return min(24, max(10, sweep.seeds_for(max(spread.values()), 0.01)))


def phase1(args):
    """PHASE 1, exploratory: every row of phase1_rows() on the validation design, PHASE1_SEEDS,
    --workers runs at a time; then the settings choose() picks, written to
    results/negatives_study_phase1.json. Choosing is all it does."""
    from concurrent.futures import ThreadPoolExecutor  # each run is its own process
    rows = phase1_rows()
    with ThreadPoolExecutor(args.workers or 2) as pool:
        jobs = {(row, seed): pool.submit(run_arm, args, "validation", row, flags, seed,
                                         args.threads)
                for seed in args.seeds for row, flags in rows.items()}
        results = {}
        for (row, seed), job in jobs.items():
            results.setdefault(row, {})[seed] = job.result()
            print(f"phase 1: {row}, seed {seed}: {PRIMARY} {results[row][seed][PRIMARY]:.4f}",
                  flush=True)
    chosen = choose(results)
    spread = phase1_spread(results, {arm: top for arm, (top, _) in chosen.items()}, args.seeds)
    report = {"seeds": args.seeds, "metric": f"validation {PRIMARY} (T-shirt/top held out)",
              "chosen": {arm: top for arm, (top, _) in chosen.items()}, "spread": spread,
              "phase2_seeds": phase2_seed_count(spread),
              "gains": {arm: g for arm, (_, g) in chosen.items()},
              "runs": {row: {s: {k: v for k, v in m.items() if not isinstance(v, dict)}
                             for s, m in per.items()} for row, per in results.items()}}
    path = os.path.join(args.out, "smoke-phase1.json") if args.smoke else \
        os.path.join(HERE, "results", "negatives_study_phase1.json")  # a smoke: beside its runs
    clean = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731  JSON: no NaN
    report["gains"] = {arm: {s: {k: clean(v) for k, v in g.items()} for s, g in gains.items()}
                       for arm, gains in report["gains"].items()}  # (one seed: no sd, no p)
    data.write_text(path, json.dumps(report, indent=1, default=float))
    print(json.dumps(report["chosen"], indent=1))


# -----------------------------------------------------------------------------
# Phase 2: the frozen design (docstring), its runs, and the one look


def phase2_jobs(seeds):
    """[(regime, row, seed)] in the order they run: seed by seed, so that a stopped study holds
    whole seeds."""
    return [(regime, row, seed) for seed in seeds for regime in REGIMES for row in PHASE2_ROWS]


def ledger_of(args):
    """(the ledger's path, the seeds): the design's, or a smoke's (beside its runs, any seeds)."""
    if args.smoke:
        return os.path.join(args.out, "smoke-phase2-runs.json"), args.seeds or [9000]
    return LEDGER, PHASE2_SEEDS


def product_commit(ledger):
    """The commit every phase-2 run is made at: HEAD, with no change to the product's files
    (PRODUCT) against it, and the ledger's commit if the ledger has runs. SystemExit if not."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, check=True).stdout.strip()  # a failure: fatal
    head = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--", *PRODUCT):
        raise SystemExit(f"phase 2: {', '.join(PRODUCT)} differ from HEAD {head[:7]}; phase 2 "
                         f"runs on committed code only")
    commit = ledger.get("commit") or head
    if git("diff", "--name-only", commit, "HEAD", "--", *PRODUCT):
        raise SystemExit(f"phase 2: its runs so far were made at {commit[:7]} and the product's "
                         f"files changed since; resume there (git worktree add DIR {commit[:7]})")
    return commit


def phase2(args):
    """PHASE 2's runs (--workers at a time), each written to the ledger as it finishes; prints
    how many are done, never a metric: the one look is `analyse`."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    import threading
    path, seeds = ledger_of(args)
    ledger = read_json(path) or {"runs": {}}
    ledger["commit"] = "smoke" if args.smoke else product_commit(ledger)
    if ledger.setdefault("design", design_of()) != design_of():  # this file's frozen constants
        raise SystemExit(f"phase 2: {path} was made with another design (PHASE2_ROWS, REGIMES, "
                         f"REGIME, THREADS or the seeds differ from this file's); resume with "
                         f"the file that made it")
    every = phase2_jobs(seeds)
    jobs = [j for j in every if key_of(*j) not in ledger["runs"]]
    print(f"phase 2 at {ledger['commit'][:7]}: {len(every) - len(jobs)} of {len(every)} runs in "
          f"{path}; {len(jobs)} to run", flush=True)
    lock = threading.Lock()

    def one(regime, row, seed):
        run = argparse.Namespace(**(vars(args) | REGIMES[regime]))  # the regime's shots
        m = run_arm(run, "test", row, PHASE2_ROWS[row], seed, args.threads)
        with lock:  # the ledger is rewritten whole, atomically, after each run
            ledger["runs"][key_of(regime, row, seed)] = {k: m.get(k) for k in KEPT}
            data.write_text(path, json.dumps(ledger, indent=1, sort_keys=True))
            return len(ledger["runs"])

    with ThreadPoolExecutor(args.workers or 2) as pool:
        for done in as_completed([pool.submit(one, *j) for j in jobs]):
            print(f"phase 2: {done.result()} of {len(every)} runs done", flush=True)


def design_of():
    """What the ledger pins of this file: the constants that decide what every run is."""
    return json.loads(json.dumps({"rows": PHASE2_ROWS, "regimes": REGIMES, "regime": REGIME,
                                  "threads": THREADS, "seeds": PHASE2_SEEDS}))


def key_of(regime, row, seed):
    return f"{regime} | {row} | {seed}"


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def contrast(values, arm, base, seeds):
    """Paired over seeds: arm and base are (row, metric); values {(row, seed): metrics}. The
    sweep's paired_stats of the differences (mean, sd, 95% t-interval, two-sided t-test p)."""
    import near_ood_sweep as sweep
    d = [values[(arm[0], s)][arm[1]] - values[(base[0], s)][base[1]] for s in seeds]
    return {"arm": list(arm), "versus": list(base)} | sweep.paired_stats(d)


def analyse(args):
    """The one look: every contrast of the design, Holm within each regime's family, the
    secondary k-NN and accuracy figures, and which arms win; writes results/negatives_study.json.
    Refused until every phase-2 run is in the ledger."""
    import near_ood_sweep as sweep  # holm()
    path, seeds = ledger_of(args)
    ledger = read_json(path) or {"runs": {}}
    missing = [j for j in phase2_jobs(seeds) if key_of(*j) not in ledger["runs"]]
    if missing or len(seeds) < 2:
        raise SystemExit(f"analyse: {len(missing)} of {len(phase2_jobs(seeds))} phase-2 runs are "
                         f"not in {path} yet (run `phase2`); the one look waits for all of them")
    out = {"commit": ledger["commit"], "seeds": seeds, "regimes": {}}
    for regime in REGIMES:
        values = {(row, s): ledger["runs"][key_of(regime, row, s)] for row in PHASE2_ROWS
                  for s in seeds}
        family = [contrast(values, arm, control, seeds) | {"name": f"{a} vs its control"}
                  for a, (arm, control) in PRIMARY_OF.items()] + \
                 [contrast(values, arm, OE_SCORE, seeds) | {"name": f"{a} vs outlier exposure"}
                  for a, (arm, _) in PRIMARY_OF.items()]
        sweep.holm(family)
        secondary = [contrast(values, (row, m), (control, m), seeds) | {"name": f"{row}: {m}"}
                     for row, control in SECONDARY for m in (PRIMARY, "test_accuracy")]
        wins = [a for a in PRIMARY_OF if all(c["holm_significant"] and c["mean_delta"] > 0
                                             for c in family if c["name"].startswith(a))]
        means = {f"{r}: {m}": float(np.mean([values[(r, s)][m] for s in seeds]))
                 for r in PHASE2_ROWS for m in METRICS_OF[r]}
        out["regimes"][regime] = {"family": family, "secondary": secondary, "wins": wins,
                                  "means": means}
        if regime == "competent":
            competent = values
    out["decision"] = decide(out["regimes"], competent, seeds)
    path = os.path.join(args.out, "smoke-negatives_study") if args.smoke else \
        os.path.join(HERE, "results", "negatives_study")
    data.write_text(path + ".json", json.dumps(out, indent=1))
    report(out, path)
    print(json.dumps({r: v["wins"] for r, v in out["regimes"].items()} | out["decision"]))


def decide(regimes, values, seeds):
    """The docstring's Winner and A null, computed. A winner: an arm that wins the competent
    regime with neither few-shot contrast negative after Holm (the larger mean gain over outlier
    exposure among several). None: the three scores of control + OE's run in the competent
    regime (outlier exposure's MSP, k-NN, k-NN+neg), each a mean with its 95% t-interval, and the
    highest against the other two, paired."""
    import near_ood_sweep as sweep  # paired_stats
    negative = lambda c: c["holm_significant"] and c["mean_delta"] < 0  # noqa: E731
    eligible = [a for a in regimes["competent"]["wins"] if not any(
        negative(c) for c in regimes["few-shot"]["family"] if c["name"].startswith(a))]
    over_oe = {c["name"].split()[0]: c["mean_delta"] for c in regimes["competent"]["family"]
               if c["name"].endswith("outlier exposure")}
    if eligible:
        return {"winner": max(eligible, key=over_oe.get), "eligible": eligible}
    scores = {"outlier exposure MSP": OE_SCORE, "k-NN": (CONTROL_OE, PRIMARY),
              "k-NN+neg": (CONTROL_OE, "ood_auroc_knn_neg")}
    level = {}
    for name, (row, metric) in scores.items():  # a level's interval: its differences from 0
        x = sweep.paired_stats([values[(row, s)][metric] for s in seeds])
        level[name] = {"mean": x["mean_delta"], "ci95": x["ci95"]}
    top = max(level, key=lambda n: level[n]["mean"])
    return {"winner": None, "scores": level, "highest": top,
            "highest_versus": [contrast(values, scores[top], scores[o], seeds) | {
                "name": f"{top} vs {o}"} for o in scores if o != top]}



def interval(c):
    """A contrast's mean difference and 95% interval as two markdown cells."""
    return f"{c['mean_delta']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"


def report(out, path):
    """analyse's results as markdown (path.md) and a picture of the contrasts (path.png)."""
    lines = ["# The negatives study, phase 2 (confirmatory)", "",
             f"`python benchmarks/negatives_study.py analyse`: {len(out['seeds'])} seeds "
             f"({out['seeds'][0]}-{out['seeds'][-1]}), product code at {out['commit'][:7]}, one "
             f"thread a run. The design is the script's docstring (PHASE 2), frozen before the "
             f"first run. AUROC: shirt + pullover against the 7 ID classes' test images, ID "
             f"positive.", ""]
    for regime, r in out["regimes"].items():
        lines += [f"## {regime} ({REGIMES[regime]['shots']} training images a class)", "",
                  "| contrast | mean difference | 95% interval | p | Holm |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['name']} | {interval(c)} | {c['p']:.2g} | "
                  f"{'significant' if c['holm_significant'] else 'not significant'} |"
                  for c in r["family"]]
        lines += ["", f"Arms that win (both contrasts positive after Holm): "
                  f"{', '.join(r['wins']) or 'none'}.", "", "Secondary (intervals, no tests):", "",
                  "| row: metric, against its control | mean difference | 95% interval |",
                  "|---|---|---|"]
        lines += [f"| {c['name']} | {interval(c)} |" for c in r["secondary"]]
        lines += ["", "| row: metric | mean over seeds |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["means"].items()] + [""]
    d = out["decision"]
    lines += ["## The reading fixed in advance", ""]
    if d["winner"]:
        lines += [f"Winner: {d['winner']} (eligible: {', '.join(d['eligible'])}). It becomes "
                  f"what --negative-data and --negatives near_ood do by default."]
    else:
        lines += ["No arm wins. Competent regime, control + OE's run:", "",
                  "| score | mean AUROC | 95% interval |", "|---|---|---|"]
        lines += [f"| {n} | {v['mean']:.4f} | [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] |"
                  for n, v in d["scores"].items()]
        lines += ["", f"Highest: {d['highest']}; " + "; ".join(
            f"{c['name']} {interval(c).replace(' |', '')}" for c in d["highest_versus"]) + "."]
    lines += ["", "## What it cannot show", ""] + [f"- {c}" for c in CAVEATS]
    data.write_text(path + ".md", "\n".join(lines + [""]))
    plt = data.pyplot()
    fig, axes = plt.subplots(1, len(out["regimes"]), figsize=(11, 4), sharey=True)
    for ax, (regime, r) in zip(np.atleast_1d(axes), out["regimes"].items()):
        means = [c["mean_delta"] for c in r["family"]]
        err = [[m - c["ci95"][0] for m, c in zip(means, r["family"])],
               [c["ci95"][1] - m for m, c in zip(means, r["family"])]]
        ax.errorbar(means, range(len(means)), xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(means)), [c["name"] for c in r["family"]])
        ax.set(title=regime, xlabel="AUROC difference, 95% interval")
    fig.tight_layout()
    data.atomic_write(path + ".png", lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def best_arm(args):
    """The synthetic row's arm (docstring): the largest mean gain over its control in the
    competent regime of `analyse`'s results (a choice, not a test)."""
    path = os.path.join(args.out, "smoke-negatives_study.json") if args.smoke else \
        os.path.join(HERE, "results", "negatives_study.json")
    result = read_json(path)
    if result is None:
        raise SystemExit(f"synthetic: no {path}; run `analyse` first (it names the best arm)")
    gains = {c["name"].split()[0]: c["mean_delta"] for c in
             result["regimes"]["competent"]["family"] if c["name"].endswith("its control")}
    return max(gains, key=gains.get)


def synthetic(args):
    """THE SYNTHETIC ROW: for each of SYN_SEEDS (two at a time), synthetic_seed; each written to
    SYN_LEDGER as it finishes."""
    from concurrent.futures import ThreadPoolExecutor
    import threading
    path = os.path.join(args.out, "smoke-synthetic.json") if args.smoke else SYN_LEDGER
    runs_path, seeds = ledger_of(args)
    phase2_ledger = read_json(runs_path)
    runs = phase2_ledger["runs"]
    ledger = read_json(path) or {"seeds": {}}
    todo = [s for s in (seeds if args.smoke else SYN_SEEDS) if str(s) not in ledger["seeds"]]
    if todo or "commit" not in ledger:  # a finished ledger is only reported, from any commit
        # phase 2's product code, not only this ledger's: the rows' flags mean what they meant
        ledger["commit"] = "smoke" if args.smoke else product_commit(phase2_ledger)
        ledger["machine"] = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch "
                             f"{importlib.metadata.version('torch')}")
    ledger["arm"] = arm = ledger.get("arm") or best_arm(args)  # a finished ledger keeps its own
    lock = threading.Lock()

    def one(seed):
        entry = synthetic_seed(args, arm, seed, runs)
        with lock:
            ledger["seeds"][str(seed)] = entry
            data.write_text(path, json.dumps(ledger, indent=1, sort_keys=True))
        print(f"synthetic row: seed {seed} done ({entry['band']['kept']} of "
              f"{entry['band']['near_ood_images']} kept)", flush=True)

    with ThreadPoolExecutor(args.workers or 2) as pool:
        list(pool.map(one, todo))
    trained = [int(s) for s, e in ledger["seeds"].items() if e["band"]["kept"]]  # kept some
    if len(trained) > 1:  # the arm against its control, paired over those seeds
        (row, metric), (control, base) = PRIMARY_OF[arm]
        values = {(r, int(s)): e[r] for s, e in ledger["seeds"].items() if e["band"]["kept"]
                  for r in (row, control)}
        ledger["contrast"] = contrast(values, (row, metric), (control, base), sorted(trained))
        data.write_text(path, json.dumps(ledger, indent=1, sort_keys=True))
    synthetic_report(ledger, runs, path[:-len(".json")] + ".md")


def synthetic_report(ledger, runs, path):
    """The synthetic row as markdown: each seed's band and counts, the arm against its control
    (the docstring's reading), and, for scale, the same seeds' contrast with the real coats."""
    (row, metric), (control, base) = PRIMARY_OF[ledger["arm"]]
    seeds = sorted(ledger["seeds"], key=int)
    strengths = SYN_STRENGTHS.split(",")
    lines = ["# The negatives study: the synthetic row", "",
             f"`python benchmarks/negatives_study.py synthetic`: seeds {', '.join(seeds)}, the "
             f"competent regime, product code at {ledger['commit'][:7]}, "
             f"machine: {ledger.get('machine', 'not recorded')}; one thread a run. Arm "
             f"{ledger['arm']} ({row}: {metric}) and its control ({control}: {base}), with "
             f"--negative-data the ddpm's near-OOD variations (strengths {SYN_STRENGTHS}, one "
             f"per training image) that the band filter keeps: k-NN scores inside the coats' "
             f"5%-95% band, meter = the seed's {CONTROL_OE} run. The rest of the study, and "
             f"which arm is best by the docstring's rule: negatives_study.md.", "",
             "| seed | band | generated | " + " | ".join(f"kept at {x}" for x in strengths)
             + " | kept | arm | control |", "|---" * (6 + len(strengths)) + "|"]
    kept = {x: 0 for x in strengths}
    for s in seeds:
        e = ledger["seeds"][s]
        b = e["band"]
        by = {f"{float(k):g}": n for k, (n, _) in b["kept_by_strength"].items()}  # kept, made
        kept = {x: kept[x] + by.get(x, 0) for x in strengths}
        cells = [f"{e[r][m]:.4f}" if r in e else "not trained" for r, m in ((row, metric),
                                                                             (control, base))]
        lines.append(f"| {s} | [{b['low']:.3f}, {b['high']:.3f}] | {b['near_ood_images']} | "
                     + " | ".join(str(by.get(x, 0)) for x in strengths)
                     + f" | {b['kept']} | {' | '.join(cells)} |")
    lines += ["", "Kept over all seeds, by strength: "
              + ", ".join(f"{x}: {kept[x]}" for x in strengths) + ".", ""]
    c = ledger.get("contrast")
    if c is None:
        lines += ["No contrast: fewer than two seeds kept any image, so nothing was compared."]
    else:  # the docstring's reading; then the real coats on the same seeds, for scale only
        trained = [s for s in seeds if control in ledger["seeds"][s]]  # kept some images
        real = {(r, int(s)): runs[key_of("competent", r, int(s))] for s in trained
                for r in (row, control)}
        same = contrast(real, (row, metric), (control, base), [int(s) for s in trained])
        lines += ["| contrast (paired over seeds) | mean difference | 95% interval |",
                  "|---|---|---|"]  # intervals without tests (the docstring's Secondary)
        lines += [f"| {name} | {interval(x)} |" for name, x in (
            (f"{ledger['arm']} against its control, synthetic negatives", c),
            (f"{ledger['arm']} against its control, the real coats (phase 2, same seeds; for "
             f"scale, not a test)", same))]
        again = sum(abs(real[(control, int(s))][base] - ledger["seeds"][s][control][base])
                    < 5e-5 for s in trained)  # a rerun's check
        null = c["ci95"][0] <= 0 <= c["ci95"][1]
        lines += ["", "Secondary: one interval, no test, no Holm." + (
            " Its interval holds 0: no effect as large as its half-width was found at this "
            "many seeds." if null else "") + f" The control's {base} equals phase 2's control "
            f"run's to four digits on {again} of the {len(trained)} seeds it ran on (same seed, "
            f"code and threads; other negatives, at weight 0)."]
    data.write_text(path, "\n".join(lines + [""]))


def synthetic_seed(args, arm, seed, runs):
    """One seed of the synthetic row: the ddpm's near-OOD variations of the seed's competent-
    regime training images (dafusion.py), the band filter (evaluate.py --nearness --band-of the
    coats, the seed's control + OE run as the reference), then the arm's row and its control's
    row with the kept images as --negative-data. Returns the ledger's entry."""
    out = os.path.join(args.out, "synthetic", f"seed{seed}")
    step(["dafusion.py", "--data", "fashion-mnist", "--data-root", os.path.join(args.data, "test"),
          "--ood-classes", ood_flag("test"), "--seed", str(seed), "--examples-per-class", "200",
          "--out", out, "--kinds", "near_ood", "--strengths", SYN_STRENGTHS, "--per-image", "1",
          "--gen-device", "cpu"] + (["--ddpm-steps", "2"] if args.smoke else []))
    run = argparse.Namespace(**(vars(args) | REGIMES["competent"]))
    reference = runs[key_of("competent", CONTROL_OE, seed)]["run_dir"]
    if not os.path.exists(os.path.join(reference, "model.pt")):  # another machine's folder:
        reference = run_arm(run, "test", CONTROL_OE, PHASE2_ROWS[CONTROL_OE], seed,  # made
                            args.threads)["run_dir"]  # again (same seed, code, one thread)
    step(["evaluate.py", "--nearness", out, "--run", reference, "--band-of",
          os.path.join(args.data, "coat"), "--device", "cpu"])
    band = read_json(os.path.join(out, "nearness.json"))["band"]
    entry = {"band": {k: band[k] for k in ("low", "high", "kept", "near_ood_images",
                                           "kept_by_strength", "reference_images")}}
    for row in sorted({PRIMARY_OF[arm][0][0], PRIMARY_OF[arm][1][0]}) if band["kept"] else ():
        flags = [band["folder"] if f == NEG else f for f in PHASE2_ROWS[row]]
        m = run_arm(run, "test", f"synthetic {row}", flags, seed, args.threads)
        entry[row] = {k: m.get(k) for k in KEPT}
    return entry


def step(argv):
    """One of the product's scripts in its own process; SystemExit naming it if it fails."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(THREADS)))
    if done.returncode:
        raise SystemExit(f"synthetic row: {' '.join(argv[:3])} ... failed: "
                         f"{done.stderr.strip().splitlines()[-1:]}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "regime", "phase1", "phase2", "analyse",
                                       "synthetic"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="regime: real only's seeds (default 0 1 2); phase1: PHASE1_SEEDS")
    p.add_argument("--design", choices=["test", "validation"], default="test",
                   help="regime: which design's real only")
    p.add_argument("--shots", type=int, default=None, help="regime: images per class (0: all)")
    p.add_argument("--train-steps", type=int, default=None, help="regime: other than REGIME's")
    p.add_argument("--batch-size", type=int, default=None, help="regime: other than REGIME's")
    p.add_argument("--image-size", type=int, default=None, help="regime: other than REGIME's")
    p.add_argument("--temperature", type=float, default=None, help="regime: other than REGIME's")
    p.add_argument("--augment", default=None, help="regime: other than REGIME's")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per run")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at a time (default: regime 1, phase1 2)")
    p.add_argument("--source", default=SOURCE, help="the Fashion-MNIST IDX files (.gz or not)")
    p.add_argument("--data", default=os.path.join(ROOT, ".data", "fmnist-study"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "negatives_study"))
    p.add_argument("--smoke", action="store_true", help="2 steps a run, 1 probe epoch")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.train_steps = args.train_steps or 2
    prepare(args)
    if args.command == "regime":
        args.seeds = args.seeds or [0, 1, 2]
        regime(args)
    elif args.command == "phase1":
        if any(getattr(args, k) is not None for k in ("shots", "batch_size", "image_size",
                                                      "temperature", "augment")) or \
                (args.train_steps and not args.smoke):
            raise SystemExit("phase1 runs the REGIME; --shots, --batch-size, --image-size and "
                             "--train-steps are for the regime command (or --smoke)")
        args.seeds = args.seeds or PHASE1_SEEDS
        phase1(args)
    elif args.command == "phase2":
        if not args.smoke and (args.seeds or not PHASE2_SEEDS):
            raise SystemExit("phase 2 runs the frozen design's seeds (--seeds: with --smoke only)")
        if any(getattr(args, k) is not None for k in ("shots", "batch_size", "image_size",
                                                      "temperature", "augment")) or \
                (args.train_steps and not args.smoke) or args.threads != THREADS:
            raise SystemExit("phase 2 runs the frozen design: --shots, --batch-size, "
                             "--image-size, --temperature, --augment, --train-steps and "
                             "--threads are for the regime command")
        phase2(args)
    elif args.command == "analyse":
        analyse(args)
    elif args.command == "synthetic":
        synthetic(args)


if __name__ == "__main__":
    data.run_command(main)
