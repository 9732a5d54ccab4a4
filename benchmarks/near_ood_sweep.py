"""
benchmarks/near_ood_sweep.py -- When do near-OOD negatives help? A calibrated sweep with a
control, the obvious alternative (outlier exposure) and paired statistics.

The thesis asked whether "bad" synthetic images (high-strength SDEdit variations) used ONLY as
negatives in the SupCon loss improve accuracy and OOD detection. Every row of the real + ID
family trains the same encoder (same initial weights, labelled batches, labelled views and
dropout masks) for the same number of optimiser steps and is evaluated on the same sets; each is
compared seed by seed with a control that has identical batches and compute but gives the
negatives weight 0 in the loss. (The small CNN has no batch norm, so at w = 0 the negatives change
the labelled rows' gradients by float rounding alone -- the backward sums over a larger batch --
yet training amplifies that rounding into another trajectory within tens of steps: real + ID
against the control, printed as the noise check, measures how far two runs apart by rounding
alone end up, i.e. the noise floor of every paired difference.)

Setup (CPU version): CIFAR-10 JPEGs (../shared/data), 7 training classes (airplane, automobile,
bird, deer, frog, ship, truck), 50 real images per class (seeded), the fruit project's small CNN
at 32 px, SupCon (tau 0.1), 128 labelled images per batch (+ 32 negatives on top), AdamW 1e-3,
the same --train-steps for every row. Held out: cat and dog (the test near-OOD classes: animals
like the training birds, deer and frogs) and horse (the VALIDATION OOD class, used only to
choose the best strength). One synthetic set per seed from the offline ddpm generator: 2 ID
variations per image at strength 0.2 and 2 near-OOD variations at each of 0.3, 0.5, 0.7, 0.9
(dafusion.py --strengths), shared by all rows of the seed; its nearness table (evaluate.py's
meter, the seed's real + ID run as reference) says which strengths are near-OOD by measurement.

Primary metric, fixed before running: k-NN OOD AUROC (Sun et al. 2022) with k = 5 of the 350
real training images (k/N = 1.4%; their k = 50 of 50,000 is 0.1%, and k = 50 here would be a
whole class), of the held-out cat and dog test images against the 7,000 ID test images. Also:
FPR@95 of that score, k = 1 and 50, MSP AUROC, linear-probe test accuracy (the run's probe, and
a probe refitted on the real images alone), a far-OOD set (the 1,797 sklearn digits at 32 px
RGB). Validation: 100 training images per class outside every seed's few-shot set (ID) against
500 horse training images (OOD), k = 5: images none of seeds 0-9 drew from the 600 per class;
seeds 10 and up draw from the 500 that validation left (the folder <folder>-free).

Rows. Phase 1 (the confirmatory family, fixed in advance): near-OOD negatives at 0.3 / 0.5 /
0.7 / 0.9 and the ID variations (0.2) as negatives, each against the control (same-class
masking, w = 1, 32 negatives per batch), Holm-corrected on the primary metric; beside them
real only and real + ID (descriptive; real + ID against the control is the noise check). The
best strength is chosen on validation: the strength with the largest mean paired gain over
the control, if that gain exceeds the 0.5 row's by more than one standard error, else 0.5.
Phase 2 (exploratory, against "negatives s=best" and against the control): w = 0.25 and 4, 0.1
and 0.5 of a batch, --hard-negatives all; and outlier exposure (Hendrycks et al. 2019, lambda
0.5), the near-OOD images of the best strength on the linear probe of the real + ID encoder (no
negatives in SupCon), against real + ID on MSP and accuracy (its encoder IS real + ID's).

Statistics: per row and metric, the per-seed differences to the reference row on the seeds both
have, their mean and 95% t-interval, a two-sided paired t-test; Holm at 0.05 over the phase-1
family (fixed in advance), and over every row against the control.

Run:  python benchmarks/near_ood_sweep.py --seeds 0 1 2 3 4          # hours on 2 CPU cores
      python benchmarks/near_ood_sweep.py --seeds 0 1 2 3 4 --more-seeds 5 6 7   # the phase-1
            family on more seeds, any number (the strength stays the one seeds 0-4 chose)
      ... --more-seeds 5 6 7 --more-phase2-seeds 5 6   # phase 2 and outlier exposure too
      ... --reuse-results   # take the runs the results JSON holds, train only the others
      python benchmarks/near_ood_sweep.py --tables-only    # the tables anew from the JSON
      python benchmarks/near_ood_sweep.py --seeds 0 1 --train-steps 20 --smoke \
            --out runs/sweep-smoke                                 # a smoke run
Runs go to runs/sweep/ (a stopped sweep continues: finished runs and their measurements, each
run folder's sweep_metrics*.json, are reused; delete runs/sweep after changing the code; a sweep
with other run-shaping options into the same --out is refused, since its runs would be reused as
if made with them); results to benchmarks/results/near_ood_sweep.{json,md,png}.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import dafusion  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEST_OOD, VAL_OOD = ["cat", "dog"], ["horse"]
STRENGTHS = [0.3, 0.5, 0.7, 0.9]
CONTROL_STRENGTH = 0.5  # the thesis's near-OOD strength; w = 0 removes it from the loss
K = 5  # the primary k of the k-NN score (see the top of this file)
PRIMARY, SELECT = "test_knn_auroc", "val_knn_auroc"  # the primary metric; the one that chooses
CONTROL, REAL_ID = "control (w = 0)", "real + ID"
LATER_SEEDS = 10  # seeds from here on draw their few-shot sets from the images validation left
METRICS = [  # (key, what)
    ("test_knn_auroc", f"k-NN (k={K}) OOD AUROC, cat+dog (primary)"),
    ("test_knn_fpr95", f"k-NN (k={K}) FPR@95, cat+dog"),
    ("test_knn1_auroc", "k-NN (k=1) AUROC"), ("test_knn50_auroc", "k-NN (k=50) AUROC"),
    ("test_msp_auroc", "MSP AUROC, cat+dog"), ("test_accuracy", "test accuracy"),
    ("test_accuracy_real_probe", "test accuracy, probe on real images"),
    ("far_knn_auroc", f"far OOD (digits) k-NN AUROC"), ("far_knn_fpr95", "far OOD FPR@95"),
    ("val_knn_auroc", "validation: k-NN AUROC, horse"),
]


# the thesis's way, typed: train.py's default for a run with negatives is now score (the
# negatives study); this sweep measured the denominators, the default when it ran
THESIS = ["--negative-mode", "denominators"]


def phase1_rows():
    """{row name: (train.py flags, uses the synthetic set)}: the confirmatory family and the
    descriptive rows, all at 32 negatives per batch when they have negatives."""
    table = {"real only": ([], False), REAL_ID: (["--positives", "id"], True),
             CONTROL: negatives(CONTROL_STRENGTH, "--negative-weight", "0")}
    table.update({f"negatives s={s}": negatives(s) for s in STRENGTHS})
    table["ID variations (0.2) as negatives"] = (["--positives", "id", "--negatives", "id",
                                                  *THESIS], True)
    return table


def phase2_rows(best):
    """The exploratory rows at the chosen strength (outlier exposure is measured, not run)."""
    return {f"negatives s={best}, w=0.25": negatives(best, "--negative-weight", "0.25"),
            f"negatives s={best}, w=4": negatives(best, "--negative-weight", "4"),
            f"negatives s={best}, 0.1 of a batch": negatives(best, "--negatives-per-batch", "0.1"),
            f"negatives s={best}, 0.5 of a batch": negatives(best, "--negatives-per-batch", "0.5"),
            f"negatives s={best}, all anchors": negatives(best, "--hard-negatives", "all")}


def negatives(strength, *more):
    """A row of real + ID with the near-OOD images of `strength` as negatives."""
    return (["--positives", "id", "--negatives", "near_ood", "--near-ood-strength",
             str(strength), *THESIS, *more], True)


# -----------------------------------------------------------------------------
# Data: a folder with what the sweep reads, and the evaluation sets


def prepare_folder(args):
    """.data/cifar10-sweep: the first --train-per-class training images of each class and every
    test image, copied from the CIFAR-10 JPEG folder (reading 60,000 files per run would cost
    more than training)."""
    out = args.folder
    if os.path.exists(os.path.join(out, "done")):
        return out
    source = args.cifar
    if not os.path.isdir(source):
        raise SystemExit(f"{source}: extract ../shared/data/cifar10-jpeg.tar.gz into .data first")
    for split, limit in (("train", args.train_per_class), ("test", None)):
        for c in CLASSES:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(source, split, c)))[:limit]:
                shutil.copy(os.path.join(source, split, c, name), os.path.join(out, split, c, name))
    open(os.path.join(out, "done"), "w").close()
    return out


def free_folder(args, sets):
    """<folder>-free: the sweep's folder without the validation images, for seeds 10 and up.
    Seeds 0-9 draw their few-shot sets from the whole folder, and validation holds only images
    none of them drew; a later seed draws from this folder, so validation stays out of its
    training set too. Hard links: the same files, no copies."""
    out = args.folder + "-free"
    held = sorted(os.path.relpath(name, args.folder) for name in sets["val_id"].names)
    done = os.path.join(out, "done")  # lists the images left out
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            if f.read().split("\n") == held:
                return out
        shutil.rmtree(out)  # made for another validation set (--val-per-class, --shots): anew
    for folder, _, files in os.walk(args.folder):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), args.folder)
            if path != "done" and path not in held:
                os.makedirs(os.path.dirname(os.path.join(out, path)), exist_ok=True)
                if not os.path.exists(os.path.join(out, path)):  # a stopped link pass resumes
                    os.link(os.path.join(args.folder, path), os.path.join(out, path))
    data.write_text(done, "\n".join(held))
    return out


def seed_folder(args, seed):
    """The folder a seed's runs and synthetic set read (see free_folder)."""
    return args.folder if seed < LATER_SEEDS else args.folder + "-free"


def check_settings(args):
    """<out>/settings.json: the options that shape a run or a measurement. A sweep into a folder
    made with other ones is refused (its runs would be reused as if made with these)."""
    path = os.path.join(args.out, "settings.json")
    mine = {key: getattr(args, key) for key in ("train_steps", "batch_size", "shots", "per_image",
                                                "train_per_class", "val_per_class", "folder")}
    if not os.path.exists(path):
        os.makedirs(args.out, exist_ok=True)
        data.write_text(path, json.dumps(mine, indent=1))
    with open(path, encoding="utf-8") as f:
        made = json.load(f)
    other = ", ".join(f"--{k.replace('_', '-')} {made.get(k)}" for k in mine
                      if made.get(k) != mine[k])
    if other:
        raise SystemExit(f"--out {args.out}: its runs were made with {other}; pass those, "
                         f"another --out, or delete the folder")


def data_flags(args, seed):
    """The data options every run and every synthetic set of a seed shares."""
    return ["--data", seed_folder(args, seed), "--ood-classes", ",".join(TEST_OOD + VAL_OOD),
            "--examples-per-class", str(args.shots), "--seed", str(seed)]


def evaluation_sets(args):
    """The evaluation sets, the same for every run: validation ID / OOD, test ID / OOD, far OOD;
    and the 7-class training images every seed's few-shot set is drawn from (as train.py
    draws it: the held-out classes removed, then data.few_shot_indices)."""
    everything = data.load_data(args.folder, ood_classes="")  # all 10 classes, read once
    index = {c: everything.classes.index(c) for c in CLASSES}
    kept = [index[c] for c in CLASSES if c not in TEST_OOD + VAL_OOD]
    pool, test_id = data.remap(everything.train, kept), data.remap(everything.test, kept)
    used = set()  # every image some seed's few-shot set holds (seeds 0-9): never validation
    for seed in range(LATER_SEEDS):
        used |= set(data.few_shot_indices(pool.labels, args.shots, seed).tolist())
    g = torch.Generator().manual_seed(12345)
    val = []
    for c in range(len(kept)):
        free = [i for i in torch.nonzero(pool.labels == c).squeeze(1).tolist() if i not in used]
        val += [free[i] for i in torch.randperm(len(free), generator=g)[:args.val_per_class]]
    horse = torch.nonzero(everything.train.labels == index[VAL_OOD[0]]).squeeze(1)
    from sklearn.datasets import load_digits  # far OOD: another data set altogether
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    digits = torch.nn.functional.interpolate(digits, size=(32, 32), mode="bilinear")
    digits = (digits.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    sets = {"val_id": pool.subset(torch.tensor(sorted(val))),
            "val_ood": everything.train.subset(horse[:500]), "test_id": test_id,
            "test_ood": data.remap(everything.test, [index[c] for c in TEST_OOD]),
            "far": data.ImageSet(digits.contiguous(), torch.zeros(len(digits), dtype=torch.long),
                                 ["ood"])}
    return sets, pool


def seed_splits(pool, sets, args, seed):
    """The splits a run of `seed` trained on (its few-shot real images), without reading files:
    train.py's draw from the seed's folder, whose images are the pool's (less validation's for
    seeds 10 and up) in the same order, named by that folder as a manifest names them."""
    folder = seed_folder(args, seed)
    if folder != args.folder:
        held = set(sets["val_id"].names)
        pool = pool.subset([i for i, name in enumerate(pool.names) if name not in held])
        pool.names = [os.path.join(folder, os.path.relpath(name, args.folder))
                      for name in pool.names]
    train_set = pool.subset(data.few_shot_indices(pool.labels, args.shots, seed))
    return data.Splits(train_set, sets["test_id"], sets["test_ood"], pool.classes,
                       TEST_OOD + VAL_OOD, folder)


# -----------------------------------------------------------------------------
# Runs and their metrics


def synthetic_set(args, seed):
    """The seed's synthetic set (made once; dafusion.py resumes and reuses)."""
    out = os.path.join(args.out, f"synthetic-seed{seed}")
    dafusion.main(data_flags(args, seed) + ["--out", out, "--per-image", str(args.per_image),
                                            "--strengths", ",".join(map(str, STRENGTHS))])
    return out


def run_folder(args, seed, name):
    """runs/sweep/runs/<row>-seed<seed>."""
    folder = f"{name}-seed{seed}".replace(" ", "_").replace("=", "")
    return os.path.join(args.out, "runs", "".join(ch for ch in folder
                                                 if ch.isalnum() or ch in "_.-+,()"))


def run_row(args, seed, name, flags, synthetic):
    """One train.py run (reused if it finished before); returns its folder."""
    run_dir = run_folder(args, seed, name)
    folder = os.path.basename(run_dir)
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped half-way starts again
    argv = data_flags(args, seed) + flags + (["--synthetic", synthetic] if synthetic else []) + [
        "--model", "cnn", "--loss", "supcon", "--temperature", "0.1", "--batch-size",
        str(args.batch_size), "--train-steps", str(args.train_steps), "--warmup-steps",
        str(args.train_steps // 20), "--linear-epochs", "100", "--device", "cpu", "--no-report",
        "--out", os.path.join(args.out, "runs"), "--name", folder]
    t0 = time.time()
    train.main(argv)
    data.write_text(os.path.join(run_dir, "wall_seconds.txt"), f"{time.time() - t0:.1f}\n")
    return run_dir


def measured(run_dir, sets, splits, outliers=None, name="sweep_metrics.json"):
    """measure(), kept in the run folder as `name`: a sweep run again (more seeds, the tables
    rewritten) reads what it measured before instead of measuring 100 runs anew."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        data.write_text(path, json.dumps(measure(run_dir, sets, splits, outliers), indent=1))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def measure(run_dir, sets, splits, outliers=None):
    """The sweep's metrics of a finished run, from its model.pt and the evaluation sets.
    outliers: near-OOD images to refit the run's probe with outlier exposure (lambda 0.5) on
    the same probe images, for the outlier-exposure row."""
    device = torch.device("cpu")
    args, splits, model, classifier, mean, std = evaluate.load_run(run_dir, device, splits=splits)
    feats = lambda s: evaluate.extract_features(model, s.images, mean, std, device)  # noqa
    reference = feats(splits.train)  # the seed's real training images: the k-NN reference
    f = {name: feats(s) for name, s in sets.items()}
    settings = argparse.Namespace(linear_epochs=100, outlier_exposure=0.5)
    real_probe = train.train_linear(settings, reference, splits.train.labels,
                                    len(splits.classes), device, args.seed)
    if outliers is not None:  # the probe of the run, refitted with outlier exposure
        probe_set = data.training_set(args, splits)[0].probe_set()
        classifier = train.train_linear(settings, feats(probe_set), probe_set.labels,
                                        len(splits.classes), device, args.seed, feats(outliers))
    with torch.no_grad():
        logits = {name: classifier(x) for name, x in f.items()}
        real_logits = real_probe(f["test_id"])
    knn = lambda name, k=K: evaluate.knn_score(reference, f[name], k)  # noqa: E731
    auroc = lambda s_in, s_out: evaluate.ood_metrics(s_in, s_out)  # noqa: E731
    accuracy = lambda x, s: float((x.argmax(1) == s.labels).float().mean())  # noqa: E731
    test, far = auroc(knn("test_id"), knn("test_ood")), auroc(knn("test_id"), knn("far"))
    out = {"test_knn_auroc": test["auroc"], "test_knn_fpr95": test["fpr95"],
           "test_knn1_auroc": auroc(knn("test_id", 1), knn("test_ood", 1))["auroc"],
           "test_knn50_auroc": auroc(knn("test_id", 50), knn("test_ood", 50))["auroc"],
           "test_msp_auroc": auroc(evaluate.msp_score(logits["test_id"]),
                                   evaluate.msp_score(logits["test_ood"]))["auroc"],
           "test_accuracy": accuracy(logits["test_id"], sets["test_id"]),
           "test_accuracy_real_probe": accuracy(real_logits, sets["test_id"]),
           "far_knn_auroc": far["auroc"], "far_knn_fpr95": far["fpr95"],
           "val_knn_auroc": auroc(knn("val_id"), knn("val_ood"))["auroc"],
           "val_accuracy": accuracy(logits["val_id"], sets["val_id"])}
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as fh:
        out["optimizer_steps"] = json.load(fh)["optimizer_steps"]
    with open(os.path.join(run_dir, "wall_seconds.txt")) as fh:
        out["wall_seconds"] = float(fh.read())
    return out


# -----------------------------------------------------------------------------
# Paired statistics


def paired(results, names, versus, metric, family=False):
    """For each row: the per-seed differences to `versus` (on the seeds both rows have), their
    mean, sd, 95% t-interval and a two-sided paired t-test; family: Holm at 0.05 across these
    rows."""
    out = []
    for name in names:
        seeds = sorted(set(results[name]) & set(results[versus]))
        d = [results[name][s][metric] - results[versus][s][metric] for s in seeds]
        out.append({"config": name, "versus": versus, "metric": metric} | paired_stats(d))
    if family:
        holm(out)
    return out


def paired_stats(differences):
    """Per-seed differences -> n, their mean and sd, the 95% t-interval of the mean and a
    two-sided one-sample t-test's p (NaN where one seed, or no spread, leaves them undefined)."""
    from scipy import stats  # installed with scikit-learn
    d = np.asarray(differences, dtype=float)
    n, sd = len(d), d.std(ddof=1) if len(d) > 1 else math.nan
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if n > 1 and sd > 0 else math.nan
    return {"n": n, "mean_delta": float(d.mean()), "sd_delta": float(sd),
            "ci95": [float(d.mean() - half), float(d.mean() + half)], "p": p}


def holm(comparisons, key="holm_significant"):
    """Holm's step-down correction at 0.05, written to each comparison's `key`: sort the
    p-values, compare the i-th smallest (from 0) with 0.05 / (k - i); every comparison after the
    first failure is not significant."""
    order = sorted(range(len(comparisons)),
                   key=lambda i: np.nan_to_num(comparisons[i]["p"], nan=1.0))
    going = True
    for rank, i in enumerate(order):
        going = going and bool(comparisons[i]["p"] <= 0.05 / (len(comparisons) - rank))
        comparisons[i][key] = bool(going)


# -----------------------------------------------------------------------------
# The sweep


def machine():
    cpu = platform.processor() or platform.machine()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, commit {commit}"


def run_phase(args, table, sets, pool, results, configs, seeds, stored):
    """Every row of `table` for every seed, --workers runs at a time (one thread each: on two
    cores two single-thread runs do 1.3x the work of one two-thread run, with the same
    numbers); a seed's runs are queued as soon as its synthetic set is made, so no core waits
    for the other seeds' sets. Then each run is measured here. A run `stored` holds
    (--reuse-results) is taken from it, neither trained nor measured. Fills results[row][seed]
    and configs[row]."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    todo = {seed: [name for name in table if seed not in stored.get(name, {})] for seed in seeds}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=spawn, initializer=one_thread) as workers:
        making = {workers.submit(synthetic_set, args, seed): seed for seed in seeds if todo[seed]}
        jobs = {}  # (seed, row name) -> the run's future
        for made in as_completed(making):
            seed = making[made]
            if made.exception():  # say so now, not after every run queued for the other seeds
                workers.shutdown(wait=False, cancel_futures=True)
                raise made.exception()
            for name in todo[seed]:
                flags, uses = table[name]
                jobs[seed, name] = workers.submit(run_row, args, seed, name, flags,
                                                  made.result() if uses else None)
        folders = {job: future.result() for job, future in jobs.items()}
    for seed in seeds:
        for name, (flags, _) in table.items():
            results.setdefault(name, {})[seed] = (
                measured(folders[seed, name], sets, seed_splits(pool, sets, args, seed))
                if (seed, name) in folders else stored[name][seed])
            configs[name] = describe(flags)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                      results[name][seed].items()
                                                      if k.startswith("test")), flush=True)


def one_thread():
    """A worker of the sweep computes on one core."""
    torch.set_num_threads(1)


def outlier_exposure(args, sets, pool, results, configs, best, seeds, stored):
    """The outlier-exposure row: each seed's real + ID encoder, its probe refitted with the
    near-OOD images of strength `best` as outliers (or what `stored` holds of it)."""
    name = f"outlier exposure s={best}"
    for seed in seeds:
        if seed in stored.get(name, {}):
            results.setdefault(name, {})[seed] = stored[name][seed]
            continue
        run_dir = run_folder(args, seed, REAL_ID)  # finished in phase 1 or phase 2
        splits = seed_splits(pool, sets, args, seed)
        syn = data.training_set(argparse.Namespace(**{**vars(evaluate.run_settings(run_dir)),
                                                      "near_ood_strength": best}), splits)[1]
        results.setdefault(name, {})[seed] = measured(run_dir, sets, splits, syn,
                                                      f"sweep_metrics_oe{best}.json")
    configs[name] = {**describe(["--positives", "id"]), "strength": best,
                     "outlier_exposure": 0.5}


def choose_strength(results):
    """The validation rule: the strength with the largest mean paired gain over the control on
    SELECT, if that gain exceeds the 0.5 row's by more than one standard error of their paired
    difference; else the thesis's 0.5. Returns (strength, the gains)."""
    gains = {s: paired(results, [f"negatives s={s}"], CONTROL, SELECT)[0] for s in STRENGTHS}
    top = max(STRENGTHS, key=lambda s: gains[s]["mean_delta"])
    if top != 0.5:
        d = paired(results, [f"negatives s={top}"], "negatives s=0.5", SELECT)[0]
        if not d["mean_delta"] > d["sd_delta"] / math.sqrt(d["n"]):
            top = 0.5
    return top, gains


def describe(flags):
    """A row's config for the JSON: strength, weight, share, masking, outlier exposure."""
    get = lambda flag, default: flags[flags.index(flag) + 1] if flag in flags else default  # noqa
    negatives = get("--negatives", "none")
    return {"positives": get("--positives", "none"), "negatives": negatives,
            "strength": float(get("--near-ood-strength", 0.2 if negatives == "id" else 0)) or None,
            "negative_weight": float(get("--negative-weight", 1.0)),
            "negatives_share": float(get("--negatives-per-batch", 0.25)),
            "hard_negatives": get("--hard-negatives", "same_class"),
            "outlier_exposure": float(get("--outlier-exposure", 0.0))}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="every row's seeds; their validation data choose the strength")
    p.add_argument("--more-seeds", type=int, nargs="*", default=[],
                   help="more seeds for the phase-1 family, run after the choice")
    p.add_argument("--more-phase2-seeds", type=int, nargs="*", default=[],
                   help="some of --more-seeds for the phase-2 rows and outlier exposure too")
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps of every run")
    p.add_argument("--batch-size", type=int, default=128, help="labelled images per batch")
    p.add_argument("--shots", type=int, default=50, help="real training images per class")
    p.add_argument("--per-image", type=int, default=2, help="variations per image and strength")
    p.add_argument("--train-per-class", type=int, default=600,
                   help="training images per class copied into the sweep's folder")
    p.add_argument("--val-per-class", type=int, default=100, help="validation ID images per class")
    p.add_argument("--cifar", default=".data/cifar10", help="the extracted CIFAR-10 JPEG folder")
    p.add_argument("--folder", default=".data/cifar10-sweep")
    p.add_argument("--out", default=os.path.join("runs", "sweep"))
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one core each")
    p.add_argument("--smoke", action="store_true", help="write results under a smoke- name")
    p.add_argument("--reuse-results", action="store_true",
                   help="take the runs the results JSON holds (made with these settings) instead "
                        "of training them again: to add seeds where the run folders are gone")
    p.add_argument("--tables-only", action="store_true",
                   help="rewrite the .md, .png and the JSON's paired statistics from the runs "
                        "the JSON holds (no run folder needed; nothing is trained or measured)")
    return p


def main():
    args = build_parser().parse_args()
    if args.tables_only:
        return rewrite_tables(results_path(args))
    if not set(args.more_phase2_seeds) <= set(args.more_seeds):
        raise SystemExit("--more-phase2-seeds: pass seeds of --more-seeds (the phase-2 rows are "
                         "paired with phase-1 rows of the same seed)")
    t0 = time.time()
    args.folder = os.path.normpath(args.folder)  # "x/" would put x-free inside x
    check_settings(args)
    prepare_folder(args)
    sets, pool = evaluation_sets(args)
    if max(args.seeds + args.more_seeds) >= LATER_SEEDS:
        free_folder(args, sets)
    stored, nearness, made = stored_results(args)
    results, configs = {}, {}
    run_phase(args, phase1_rows(), sets, pool, results, configs, args.seeds, stored)
    check = paired(results, [REAL_ID], CONTROL, PRIMARY)[0]  # w = 0: no effect in the loss
    print(f"noise check, real + ID minus control on {PRIMARY}: {check['mean_delta']:+.2e} "
          f"(sd {check['sd_delta']:.2e})")
    best, gains = choose_strength(results)  # on --seeds alone, before any other seed runs
    print(f"validation gains over the control: " + ", ".join(
        f"s={s}: {g['mean_delta']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]"
        for s, g in gains.items()) + f"; chosen strength {best}")
    run_phase(args, phase1_rows(), sets, pool, results, configs, args.more_seeds, stored)
    phase2_seeds = args.seeds + args.more_phase2_seeds
    again = phase2(args, best, sets, pool, results, configs, phase2_seeds, stored,
                   made and made["machine"])
    setup = {"machine": machine(), "command": "python benchmarks/near_ood_sweep.py "
             + " ".join(sys.argv[1:]), "seeds": args.seeds, "more_seeds": args.more_seeds,
             "more_phase2_seeds": args.more_phase2_seeds, "train_steps": args.train_steps,
             "batch_size": args.batch_size, "shots": args.shots, "per_image": args.per_image,
             "classes": [c for c in CLASSES if c not in TEST_OOD + VAL_OOD],
             "test_ood": TEST_OOD, "val_ood": VAL_OOD, "strengths": STRENGTHS, "k": K,
             "control": CONTROL, "primary_metric": PRIMARY, "selection_metric": SELECT,
             "best_strength": best,
             "validation_gain_by_strength": {str(s): g for s, g in gains.items()},
             "evaluation_sets": {k: len(v) for k, v in sets.items()},
             "total_minutes": (time.time() - t0) / 60}
    if made:  # what was taken from the stored results, and where those were measured
        setup["reused"] = {"runs": sum(seed in stored.get(row, {}) for row in results
                                       for seed in results[row]) - len(again),
                           "from": made.get("reused", {}).get("from", []) + [
                               {k: made[k] for k in ("machine", "command", "total_minutes")}]}
    write_results(results_path(args), setup, results, configs, nearness_tables(args, nearness))


def phase2(args, best, sets, pool, results, configs, seeds, stored, made_on=None):
    """The phase-2 rows and outlier exposure on `seeds`. A seed that gets new phase-2 runs while
    `stored` (--reuse-results, made on the machine `made_on`) holds its phase-1 runs first trains
    again the two runs they lean on: real + ID (outlier exposure refits its probe) and negatives
    s=best (the same near-OOD images; phase 2's reference). Both must measure as stored, bit for
    bit, or the sweep stops before it trains more. Returns the runs trained again."""
    anchors = {name: phase1_rows()[name] for name in (REAL_ID, f"negatives s={best}")}
    later = list(phase2_rows(best)) + [f"outlier exposure s={best}"]
    new = [s for s in seeds if all(s in stored.get(row, {}) for row in anchors)
           and any(s not in stored.get(row, {}) for row in later)]
    keep = {row: {s: m for s, m in per.items() if row not in anchors or s not in new}
            for row, per in stored.items()}
    run_phase(args, anchors, sets, pool, results, configs, new, keep)
    for name in anchors:
        for seed in new:
            before, now = stored[name][seed], results[name][seed]
            differ = [k for k in before if k != "wall_seconds" and now.get(k) != before[k]]
            if differ:
                raise SystemExit(f"--reuse-results: {name}, seed {seed}, trained again here, "
                                 f"measures another {', '.join(differ)} than the stored run "
                                 f"(made on {made_on}): other code, torch or CPU; run without "
                                 f"--reuse-results")
            results[name][seed] = before  # the same run: keep its wall time
    run_phase(args, phase2_rows(best), sets, pool, results, configs, seeds, stored)
    outlier_exposure(args, sets, pool, results, configs, best, seeds, stored)
    return [(name, seed) for name in anchors for seed in new]


def results_path(args):
    return os.path.join(HERE, "results", ("smoke-" if args.smoke else "") + "near_ood_sweep.json")


def stored_results(args):
    """--reuse-results: the results JSON's runs {row: {seed: metrics}}, nearness tables
    {seed: table} and setup. Refused in one line unless its runs were shaped as this command's
    are, with the same choice seeds, and this command covers every seed it holds (the JSON is
    rewritten with this command's runs alone). Without the flag: {}, {}, None."""
    path = results_path(args)
    if not args.reuse_results:
        return {}, {}, None
    if not os.path.exists(path):
        raise SystemExit(f"--reuse-results: {path} does not exist; run without the flag")
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    setup = stored["setup"]
    made = vars(build_parser().parse_known_args(shlex.split(setup["command"])[2:])[0])
    made.update({k: setup[k] for k in ("train_steps", "batch_size", "shots", "per_image",
                                       "seeds") if k in setup})  # as recorded, not as defaults
    made["folder"] = os.path.normpath(made["folder"])
    keys = ("seeds", "train_steps", "batch_size", "shots", "per_image", "train_per_class",
            "val_per_class", "folder")
    word = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    other = ", ".join(f"--{k.replace('_', '-')} {word(made[k])}" for k in keys
                      if made[k] != getattr(args, k))
    if other:
        raise SystemExit(f"--reuse-results: {path} was made with {other}; pass those or run "
                         f"without the flag")
    for key in ("more_seeds", "more_phase2_seeds"):
        left = sorted(set(setup.get(key, [])) - set(getattr(args, key)))
        if left:
            raise SystemExit(f"--reuse-results: {path} holds runs of --{key.replace('_', '-')} "
                             f"{' '.join(map(str, left))}, which this command would drop; "
                             f"pass them too")
    runs, _ = runs_of(stored)
    return runs, {int(seed): table for seed, table in stored["nearness"].items()}, setup


def runs_of(stored):
    """The results JSON's runs as {row: {seed: metrics}} and each row's config."""
    results, configs = {}, {}
    for run in stored["runs"]:
        row = run["config"]["row"]
        results.setdefault(row, {})[run["seed"]] = run["metrics"]
        configs[row] = {k: v for k, v in run["config"].items() if k != "row"}
    return results, configs


def rewrite_tables(path):
    """--tables-only: the statistics, tables and plot anew from the runs stored in `path` (the
    run folders need not exist: they stay on the machine that ran the sweep)."""
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    results, configs = runs_of(stored)
    setup = {**stored["setup"], "tables": f"rewritten from the stored runs at {machine()}"}
    write_results(path, setup, results, configs, stored["nearness"])


def comparisons_of(results, best):
    """Every paired comparison the README reports: every trained row against the control
    (Holm on the primary metric twice: over the phase-1 family fixed in advance,
    "holm_significant", and over every row against the control, "holm_all_rows"); phase 2 also
    against "negatives s=best"; outlier exposure against real + ID (its encoder's run)."""
    family = [f"negatives s={s}" for s in STRENGTHS] + ["ID variations (0.2) as negatives"]
    phase2 = [n for n in results if n.startswith(f"negatives s={best},")]
    oe = [n for n in results if n.startswith("outlier exposure")]
    out = []
    for key, _ in METRICS:
        rows = paired(results, family, CONTROL, key, family=key == PRIMARY)
        rows += paired(results, ["real only", REAL_ID] + phase2, CONTROL, key)
        if key == PRIMARY:
            holm(rows, "holm_all_rows")
        out += rows + paired(results, phase2, f"negatives s={best}", key)
        out += paired(results, oe, REAL_ID, key)
    return out


def write_results(path, setup, results, configs, nearness):
    """The JSON at `path` (.json), the markdown tables (.md) and the strength plot (.png)."""
    runs = [{"config": {"row": name, **configs[name]}, "seed": seed, "metrics": m}
            for name in results for seed, m in sorted(results[name].items())]
    comparisons = comparisons_of(results, setup["best_strength"])
    data.write_text(path, json.dumps(
        {"setup": setup, "nearness": nearness, "runs": runs, "paired": comparisons}, indent=1))
    md = markdown(setup, results, comparisons, nearness)
    data.write_text(path[:-len(".json")] + ".md", md)
    plot(comparisons, path[:-len(".json")] + ".png")
    print(md)


def nearness_tables(args, stored):
    """The meter on every seed's set, the seed's real + ID run as the reference (or the table
    `stored` holds for the seed)."""
    tables = {}
    for seed in args.seeds + args.more_seeds:
        folder = os.path.join(args.out, f"synthetic-seed{seed}")
        reference = run_folder(args, seed, REAL_ID)
        tables[seed] = stored.get(seed) or evaluate.nearness(folder, None, run=reference,
                                                              device="cpu")
    return tables


def markdown(setup, results, comparisons, nearness):
    """The README's tables: every row's mean ± std, the paired differences, the nearness."""
    header = "| row | " + " | ".join(w for _, w in METRICS) + " |"
    rule = "|---" * (len(METRICS) + 1) + "|"
    lines = [f"Machine: {setup['machine']}. Command: `{setup['command']}`. Seeds "
             f"{setup['seeds']} (phase-1 rows also {setup['more_seeds'] or 'no others'}; phase-2 "
             f"rows and outlier exposure also {setup.get('more_phase2_seeds') or 'no others'}); "
             f"{setup['train_steps']} optimiser steps per run; total "
             f"{setup['total_minutes']:.0f} min. Strength chosen on validation: "
             f"{setup['best_strength']}." + (f" Tables {setup['tables']}." if "tables" in setup
                                             else "") + reused_line(setup, results), "",
             "Mean ± std over seeds:", "",
             header.replace("| row |", "| row | seeds |"), rule + "---|"]
    for name, per_seed in results.items():
        cells = []
        for key, _ in METRICS:
            v = np.array([m[key] for m in per_seed.values()])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences, mean [95% interval] over the seeds both rows have, against "
              "the row named (primary metric: * = significant after Holm's correction over the "
              "phase-1 family, + = after Holm over every row against the control):", "",
              header.replace("| row |", "| row | versus | seeds |"), rule + "---|---|"]
    for name, versus in dict.fromkeys((c["config"], c["versus"]) for c in comparisons):
        cells, n = [], None
        for key, _ in METRICS:
            c = next(c for c in comparisons if (c["config"], c["versus"], c["metric"]) ==
                     (name, versus, key))
            n = c["n"]
            star = "*" * bool(c.get("holm_significant")) + "+" * bool(c.get("holm_all_rows"))
            cells.append(f"{c['mean_delta']:+.4f} [{c['ci95'][0]:+.4f}, "
                         f"{c['ci95'][1]:+.4f}]{star}")
        lines.append(f"| {name} | {versus} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Seeds a 95% interval of ±0.02 / ±0.01 on the primary metric would need at "
              "each comparison's observed paired sd: " + "; ".join(
                  f"{c['config']} vs {c['versus']} (sd {c['sd_delta']:.3f}, n {c['n']}): "
                  f"{seeds_for(c['sd_delta'], 0.02)} / {seeds_for(c['sd_delta'], 0.01)}"
                  for c in comparisons if c["metric"] == PRIMARY and c["n"] > 1
                  and c["sd_delta"] > 0) + "."]
    lines += ["", "Nearness (evaluate.py --nearness; reference: the seed's real + ID run; the "
              "held-out row holds the cat, dog and horse test images), mean over seeds:", "",
              "| images | strength | source accuracy | OOD AUROC (k-NN, k = 50) |",
              "|---|---|---|---|"]
    first = next(iter(nearness.values()))
    for i, row in enumerate(first["rows"]):
        acc = np.mean([t["rows"][i]["source_accuracy"] for t in nearness.values()])
        auroc = np.mean([t["rows"][i]["ood_auroc"] for t in nearness.values()])
        lines.append(f"| {'ID' if row['kind'] == 'id' else 'near-OOD'} | {row['strength']:g} | "
                     f"{acc:.4f} | {auroc:.4f} |")
    if "held_out" in first:
        auroc = np.mean([t["held_out"]["ood_auroc"] for t in nearness.values()])
        lines.append(f"| real held-out classes | - | - | {auroc:.4f} |")
    return "\n".join(lines) + "\n"


def reused_line(setup, results):
    """The markdown's word on the runs --reuse-results took from earlier results."""
    if "reused" not in setup:
        return ""
    total = sum(len(per_seed) for per_seed in results.values())
    return (f" {setup['reused']['runs']} of the {total} runs were taken from the stored results "
            f"of " + "; then ".join(f"`{f['command']}` ({f['machine']}, {f['total_minutes']:.0f} "
                                     f"min)" for f in setup["reused"]["from"]) + ".")


def seeds_for(sd, half):
    """The fewest seeds whose 95% t-interval is at most +-half wide at this paired sd."""
    from scipy import stats
    n = 2
    while stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) > half:
        n += 1
    return n


def plot(comparisons, path):
    """The primary metric's paired difference to the control against strength (95% intervals)."""
    plt = data.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [c for c in comparisons if c["metric"] == PRIMARY and c["versus"] == CONTROL and
              c["config"].startswith("negatives s=") and "," not in c["config"]]
    xs = [float(c["config"].split("=")[1]) for c in points]
    ys = [c["mean_delta"] for c in points]
    err = [[y - c["ci95"][0] for y, c in zip(ys, points)],  # below and above each mean
           [c["ci95"][1] - y for y, c in zip(ys, points)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="near-OOD negatives (w = 1)")
    placebo = [c for c in comparisons if c["metric"] == PRIMARY and c["config"].startswith("ID ")]
    for c in placebo:
        ax.errorbar([0.2], [c["mean_delta"]], yerr=[[c["mean_delta"] - c["ci95"][0]],
                    [c["ci95"][1] - c["mean_delta"]]], marker="s", capsize=4, color="grey",
                    label="ID variations (0.2) as negatives")
    ax.axhline(0, ls=":", c="black")
    ax.set(xlabel="SDEdit strength of the negatives",
           ylabel=f"k-NN (k={K}) OOD AUROC (cat, dog) minus control",
           title="Paired difference to the control, mean and 95% interval over seeds")
    ax.legend(fontsize=8)
    data.save_figure(fig, path)


if __name__ == "__main__":
    main()
