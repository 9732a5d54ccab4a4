"""
benchmarks/positive_control.py -- Can the near-OOD sweep's setup show a gain at all? Real near-OOD
negatives, rotated copies (CSI) and outlier exposure with real images, each against its own control.

The sweep (near_ood_sweep.py) found no strength of the ddpm's "near-OOD" images that moves the
k-NN OOD AUROC by more than about 0.02. That null is only informative if the same setup CAN show a
gain when the negatives are truly near-OOD. In the literature real outliers are the strong
baseline (outlier exposure, Hendrycks et al. 2019: +6.8 AUROC over MSP on OpenOOD v1.5's CIFAR-10
near-OOD benchmark), and rotated copies of the training images used as negatives ("shifted"
instances, CSI, Tack et al. 2020) gain about 2 points; both need no generator.

Fixed before any run (committed with this docstring before the first run; the script computes the
statistics once, after the last run, and has no option to add seeds afterwards):

  Setup     the sweep's CPU setup and measurement, imported from near_ood_sweep.py: CIFAR-10
            JPEGs, 7 training classes, 50 real images per class drawn by the seed (the sweep's
            few-shot sets of the same seeds), the small CNN at 32 px, SupCon tau 0.1, 128
            labelled images per batch with 32 negatives on top (--negatives-per-batch 0.25),
            AdamW 1e-3, 300 optimiser steps and 15 warm-up steps in every run, one thread per run
            (350 images make 3 batches of about 117 labelled images an epoch). Held out: cat and
            dog (the test near-OOD classes) and horse (never trained on).
  Rows      per seed, each run paired with its own control on the same batches:
    real only                   no negatives
    (a) control / (a) horse     the sweep folder's 600 horse TRAINING images through
                                --negative-data (a flat folder: negatives of every anchor), at
                                --negative-weight 0 / 1. Horse is not a test class, and no
                                strength is chosen here, so no validation set is needed.
    (b) control / (b) rotations rotated copies (90, 180, 270 degrees) of the seed's own 350
                                training images, as a synthetic set whose manifest marks them
                                near-OOD (--synthetic DIR --negatives near_ood), negatives of
                                every anchor as in CSI and as the horse images
                                (--hard-negatives all), at --negative-weight 0 / 1
    (c) outlier exposure        measured, not trained: real only's encoder, its linear probe
                                refitted with the horse images as outliers (lambda 0.5, as the
                                sweep's outlier-exposure row; the outlier draws share the probe's
                                random stream, so its batch order differs from real only's too)
  Primary metric  the sweep's: k-NN (k = 5) OOD AUROC of the 2,000 cat and dog test images
            against the 7,000 ID test images, the seed's 350 real training images the reference.
  Contrasts (Holm at 0.05 over the three p-values, two-sided paired t-tests over seeds):
    (a) horse minus (a) control, primary metric
    (b) rotations minus (b) control, primary metric
    (c) outlier exposure minus real only, MSP AUROC (outlier exposure changes only the probe;
        the k-NN score is the encoder's, identical in both)
  Seeds     0-34 (35): the fewest whose 95% t-interval half-width is at most 0.015 at the paired
            sd of the sweep's one row whose negatives reach every anchor, as (a) and (b) do here
            ("negatives s=0.3, all anchors" against its control: 0.0435 over 31 seeds; the
            phase-1 family, same-class masked, spread 0.026-0.036 and would need 15-25).
            seed_count() recomputes it from the stored sweep and refuses to run if it differs.
            Replicates: with R runs per seed averaged, the paired variance is
            sd_effect^2 + 2 sd_run^2 / R; the sweep's noise floor (real + ID against its control,
            identical data, sd 0.0252 = sqrt(2) sd_run) leaves sd_effect^2 = 0.0435^2 - 0.0252^2,
            so R = 1, 2, 3 need 35, 28, 26 seeds: 175, 280, 390 runs. Run noise is about a third
            of the paired variance, and replicates pay only where a seed has a fixed cost (the
            sweep's synthetic set per seed); here a seed costs no generator, so R = 1. About 3.5
            hours of a 2-core machine (sweep run times of 110-160 s, two at a time).
  Reading   (a) is a null if its 95% interval lies within +-0.015 (no gain of 0.015 or more):
            this regime -- a small CNN trained 300 steps on 50 images per class at 32 px, scored
            by k-NN on its own weak embedding (test accuracy about 0.46) -- cannot show a gain
            even from real near-OOD negatives, so the sweep's nulls say nothing about DA-Fusion's
            negatives either. An interval that reaches past +0.015 and holds 0 is inconclusive.
            A significant loss in (a) means the setup responds to negatives but not with a gain.
            A gain in (c) with a null in (a) means the probe can use real outliers and the SupCon
            loss cannot. A regime that could show a gain: OpenOOD's (ResNet-18 on all of
            CIFAR-10, where outlier exposure with real images gains +6.8 AUROC over MSP), here
            cifar10_curve.py's ResNet-18 on a GPU. A gain in (a) is that of real images with
            every-anchor masking: read it beside the sweep's "all anchors" row.

Also reported (descriptive, no test): every metric of every contrast; each control against real
only (they differ by float rounding at most; the noise check shows whether at all); how near the horse images, the
rotations and the held-out classes are by evaluate.py's meter (k-NN, k = 50, real only's encoder,
OOD AUROC against the ID test images).

Run:  python benchmarks/positive_control.py                      # about 3.5 hours on 2 CPU cores
      python benchmarks/positive_control.py --seeds 0 1 --train-steps 20 --smoke   # a smoke run
Runs go to runs/positive_control/ (a stopped run continues: finished runs are reused); results to
benchmarks/results/positive_control.{json,md,png}. Needs .data/cifar10 (extract
../shared/data/cifar10-jpeg.tar.gz into .data) and the stored sweep results.
"""

import argparse
import csv
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import data  # noqa: E402
import evaluate  # noqa: E402
import near_ood_sweep as sweep  # noqa: E402  (the setup, the measurement and the statistics)

SEEDS = list(range(35))  # fixed before running: seed_count() below
HALF_WIDTH = 0.015  # the 95% half-width the seed count is chosen for
REAL, CONTROL_A, HORSE = "real only", "(a) control: horse at w = 0", "(a) horse negatives"
CONTROL_B, ROTATIONS = "(b) control: rotations at w = 0", "(b) rotations as negatives"
OE = "(c) outlier exposure (horse)"
# the pre-registered contrasts: (row, its control, the metric)
CONTRASTS = [(HORSE, CONTROL_A, sweep.PRIMARY), (ROTATIONS, CONTROL_B, sweep.PRIMARY),
             (OE, REAL, "test_msp_auroc")]
METRICS = [m for m in sweep.METRICS if not m[0].startswith("val_")]  # horse is a negative here


def rows(horse, rotations):
    """{row: (train.py flags, the seed's synthetic folder or None)}, rotations by seed."""
    return {REAL: ([], None),
            CONTROL_A: (["--negative-data", horse, *sweep.THESIS, "--negative-weight", "0"],
                        None),
            HORSE: (["--negative-data", horse, *sweep.THESIS], None),
            CONTROL_B: (["--negatives", "near_ood", *sweep.THESIS, "--hard-negatives", "all",
                         "--negative-weight", "0"], rotations),
            ROTATIONS: (["--negatives", "near_ood", *sweep.THESIS, "--hard-negatives", "all"],
                        rotations)}


SWEEP_ALL_ANCHORS = "negatives s=0.3, all anchors"  # the sweep's row masked as (a) and (b)


def seed_count(sweep_json):
    """The seeds the design needs: the fewest whose 95% half-width is HALF_WIDTH at the paired sd
    of the sweep's every-anchor row against its control, on the primary metric."""
    with open(sweep_json, encoding="utf-8") as f:
        stored = json.load(f)
    sd = next(c["sd_delta"] for c in stored["paired"] if c["metric"] == sweep.PRIMARY
              and c["versus"] == sweep.CONTROL and c["config"] == SWEEP_ALL_ANCHORS)
    return sweep.seeds_for(sd, HALF_WIDTH), sd


# -----------------------------------------------------------------------------
# The negatives: horse photographs, and rotated copies of a seed's training images


def horse_folder(args):
    """runs/positive_control/horse: the sweep folder's horse training images, hard-linked into
    one flat folder (a --negative-data folder without class sub-folders: every anchor's)."""
    out = os.path.join(args.out, "horse")
    source = os.path.join(args.folder, "train", "horse")
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(source)):
        if not os.path.exists(os.path.join(out, name)):
            os.link(os.path.join(source, name), os.path.join(out, name))
    return out


def rotation_set(args, seed, splits):
    """runs/positive_control/rotations-seed<seed>: each training image of the seed turned by 90,
    180 and 270 degrees (exact on the pixel grid), saved as PNG with a manifest that marks them
    near-OOD variations of their source (so train.py reads them as synthetic negatives)."""
    out = os.path.join(args.out, f"rotations-seed{seed}")
    if os.path.exists(os.path.join(out, "manifest.csv")):
        return out
    lines = []
    for image, label, name in zip(splits.train.images, splits.train.labels, splits.train.names):
        cls = splits.classes[int(label)]
        stem = os.path.splitext(os.path.basename(name))[0]
        for k in (1, 2, 3):  # quarter turns
            path = f"near_ood/{cls}/{stem}_r{90 * k}.png"
            turned = torch.rot90(image, k, (1, 2)).permute(1, 2, 0).numpy()  # (H, W, C)
            os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
            from PIL import Image
            data.atomic_write(os.path.join(out, path), Image.fromarray(turned).save)  # whole
            lines.append({"path": path, "label": cls, "kind": "near_ood",
                          "source": splits.source_id(name), "strength": "1", "seed": "0",
                          "generator": f"rotation {90 * k}"})

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=data.MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(lines)
    data.atomic_write(os.path.join(out, "manifest.csv"), write)  # last: the set is complete
    return out


# -----------------------------------------------------------------------------
# Runs, measurement, nearness


def train_all(args, table_of, seeds):
    """Every row of every seed, --workers runs at a time (one thread each, as the sweep)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=spawn, initializer=sweep.one_thread) as pool:
        jobs = {(seed, name): pool.submit(sweep.run_row, args, seed, name, flags, synthetic)
                for seed in seeds for name, (flags, synthetic) in table_of[seed].items()}
        done = 0
        for (seed, name), job in jobs.items():
            job.result()
            done += 1
            print(f"[{done}/{len(jobs)}] trained seed {seed}: {name}", flush=True)


def meter(run_dir, splits, sets, horse, rotations):
    """evaluate.py's nearness meter on real only's encoder: the OOD AUROC (k-NN, k = 50, real
    training images the reference) of each image set against the ID test images."""
    device = torch.device("cpu")
    _, splits, model, _, mean, std = evaluate.load_run(run_dir, device, splits=splits)
    feats = lambda images: evaluate.extract_features(model, images, mean, std, device)  # noqa
    reference, test_id = feats(splits.train.images), feats(sets["test_id"].images)
    knn = lambda f: evaluate.knn_score(reference, f, 50)  # noqa: E731
    auroc = lambda images: evaluate.ood_metrics(knn(test_id), knn(feats(images)))["auroc"]  # noqa
    return {"horse negatives": auroc(horse.images), "rotations": auroc(rotations.images),
            "held-out cat and dog (test)": auroc(sets["test_ood"].images)}


def measure_all(args, seeds, table_of, sets, pool, horse):
    """{row: {seed: metrics}} and {seed: nearness}, each run measured once (kept beside it).
    The validation metrics are left out: their OOD images (horse) are (a)'s negatives here."""
    results, nearness = {}, {}
    for seed in seeds:
        splits = sweep.seed_splits(pool, sets, args, seed)
        negatives = data.read_negative_data(horse, splits)  # as train.py read them
        for name in table_of[seed]:
            run_dir = sweep.run_folder(args, seed, name)
            m = sweep.measured(run_dir, sets, splits)
            if m["optimizer_steps"] != args.train_steps:  # every row the same compute
                raise SystemExit(f"{run_dir}: {m['optimizer_steps']} optimiser steps, not "
                                 f"{args.train_steps}")
            results.setdefault(name, {})[seed] = m
        real_dir = sweep.run_folder(args, seed, REAL)
        results.setdefault(OE, {})[seed] = sweep.measured(real_dir, sets, splits, negatives,
                                                          "sweep_metrics_oe_horse.json")
        rotations = data.read_manifest(table_of[seed][ROTATIONS][1], splits, 32, 3)
        nearness[seed] = meter(real_dir, splits, sets, negatives, rotations)
    for per_seed in results.values():
        for m in per_seed.values():
            for key in [k for k in m if k.startswith("val_")]:
                del m[key]
    return results, nearness


# -----------------------------------------------------------------------------
# Tables


def comparisons(results):
    """The three pre-registered contrasts (Holm over them), then every metric of each and the
    noise checks (each control against real only)."""
    primary = [sweep.paired(results, [row], versus, metric)[0] for row, versus, metric in CONTRASTS]
    sweep.holm(primary)
    out = primary
    for key, _ in METRICS:
        for row, versus, metric in CONTRASTS + [(CONTROL_A, REAL, None), (CONTROL_B, REAL, None)]:
            if key != metric:
                out += sweep.paired(results, [row], versus, key)
    return out


def markdown(setup, results, paired, nearness):
    lines = [f"Machine: {setup['machine']}. Command: `{setup['command']}`. Seeds "
             f"{setup['seeds'][0]}-{setup['seeds'][-1]} ({len(setup['seeds'])}); "
             f"{setup['train_steps']} optimiser steps per run; {setup['total_minutes']:.0f} min.",
             "", "Pre-registered contrasts (Holm at 0.05 over the three), mean paired difference "
             "[95% t-interval] over seeds:", "",
             "| contrast | versus | metric | seeds | difference | p | Holm |", "|---|---|---|---|---|---|---|"]
    names = dict(METRICS)
    for c in paired[:len(CONTRASTS)]:
        lines.append(f"| {c['config']} | {c['versus']} | {names[c['metric']]} | {c['n']} | "
                     f"{c['mean_delta']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
                     f"{'-' if c['p'] is None else format(c['p'], '.2g')} | "
                     f"{'significant' if c['holm_significant'] else 'no'} |")
    header = "| row | seeds | " + " | ".join(w for _, w in METRICS) + " |"
    lines += ["", "Mean ± std over seeds:", "", header, "|---" * (len(METRICS) + 2) + "|"]
    for name, per_seed in results.items():
        cells = []
        for key, _ in METRICS:
            v = np.array([m[key] for m in per_seed.values()])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    lines += ["", "Every metric of every contrast, and the controls against real only (the noise "
              "check: they differ by float rounding alone):", "",
              header.replace("| row | seeds |", "| row | versus |"), "|---" * (len(METRICS) + 2) + "|"]
    for row, versus in dict.fromkeys((c["config"], c["versus"]) for c in paired):
        cells = []
        for key, _ in METRICS:
            c = next((c for c in paired if (c["config"], c["versus"], c["metric"]) ==
                      (row, versus, key)), None)
            cells.append("" if c is None or (c["sd_delta"] == 0 and c["mean_delta"] == 0) else
                         f"{c['mean_delta']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]")
        lines.append(f"| {row} | {versus} | " + " | ".join(cells) + " |")
    lines += ["", "How near, by evaluate.py's meter (real only's encoder, k-NN k = 50, OOD AUROC "
              "against the ID test images; 0.5 = as in-distribution as the test images), mean "
              "and range over seeds:", "", "| images | OOD AUROC | range |", "|---|---|---|"]
    for key in next(iter(nearness.values())):
        v = np.array([n[key] for n in nearness.values()])
        lines.append(f"| {key} | {v.mean():.3f} | {v.min():.3f}-{v.max():.3f} |")
    return "\n".join(lines) + "\n"


def plot(paired, sweep_json, path):
    """The contrasts with their 95% intervals, beside the sweep's rows for scale."""
    with open(sweep_json, encoding="utf-8") as f:
        stored = json.load(f)["paired"]
    plt = data.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    points = [(c["config"], c) for c in paired[:2]]
    points += [(f"sweep: ddpm {row[len('negatives '):]}", next(
        c for c in stored if c["metric"] == sweep.PRIMARY and c["versus"] == sweep.CONTROL
        and c["config"] == row)) for row in [f"negatives s={s}" for s in sweep.STRENGTHS]
        + [SWEEP_ALL_ANCHORS]]
    for ax, items, label in ((left, points, "k-NN (k=5) OOD AUROC, cat+dog: minus control"),
                             (right, [(paired[2]["config"], paired[2])],
                              "MSP AUROC, cat+dog: minus real only")):
        for x, (name, c) in enumerate(items):
            ax.errorbar([x], [c["mean_delta"]], yerr=[[c["mean_delta"] - c["ci95"][0]],
                        [c["ci95"][1] - c["mean_delta"]]], marker="o", capsize=4,
                        color="grey" if name.startswith("sweep") else "C0")
        ax.axhline(0, ls=":", c="black")
        ax.set_xticks(range(len(items)), [n.replace(" as negatives", "").replace(
            " negatives", "") for n, _ in items], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    fig.suptitle("Positive control: paired difference, mean and 95% interval over seeds "
                 "(grey: the sweep's rows, other seeds and machine, for scale)", fontsize=9)
    data.save_figure(fig, path)


def describe(flags):
    """A row's config for the JSON: which negatives, their weight, which anchors they reach."""
    get = lambda flag, default: flags[flags.index(flag) + 1] if flag in flags else default  # noqa
    source = "horse (--negative-data)" if "--negative-data" in flags else \
        "rotations (synthetic near-OOD)" if "--negatives" in flags else None
    return {"negatives": source, "negative_weight": float(get("--negative-weight", 1.0)),
            "anchors": "every anchor" if source else None, "outlier_exposure": 0.0}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="only for a --smoke run")
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps of every run")
    p.add_argument("--batch-size", type=int, default=128, help="labelled images per batch")
    p.add_argument("--shots", type=int, default=50, help="real training images per class")
    p.add_argument("--train-per-class", type=int, default=600,
                   help="training images per class in the sweep's folder")
    p.add_argument("--val-per-class", type=int, default=100,
                   help="the sweep's validation images per class (kept out of seeds 10 and up)")
    p.add_argument("--per-image", type=int, default=2, help="(the sweep's; unused here)")
    p.add_argument("--cifar", default=".data/cifar10", help="the extracted CIFAR-10 JPEG folder")
    p.add_argument("--folder", default=".data/cifar10-sweep")
    p.add_argument("--out", default=os.path.join("runs", "positive_control"))
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one core each")
    p.add_argument("--smoke", action="store_true", help="write results under a smoke- name")
    return p


def main():
    args = build_parser().parse_args()
    t0 = time.time()
    sweep_json = os.path.join(HERE, "results", "near_ood_sweep.json")
    needed, sd = seed_count(sweep_json)
    if needed != len(SEEDS):
        raise SystemExit(f"the stored sweep now asks for {needed} seeds (sd {sd:.4f}), not the "
                         f"{len(SEEDS)} fixed here")
    if not args.smoke and (args.seeds != SEEDS or args.train_steps != 300):
        raise SystemExit("--seeds and --train-steps are fixed by the design; pass --smoke to try "
                         "others")
    args.folder = os.path.normpath(args.folder)
    sweep.check_settings(args)  # a folder made with other run-shaping options is refused
    sweep.prepare_folder(args)
    sets, pool = sweep.evaluation_sets(args)
    if max(args.seeds) >= sweep.LATER_SEEDS:
        sweep.free_folder(args, sets)
    horse = horse_folder(args)
    table_of = {seed: rows(horse, rotation_set(args, seed, sweep.seed_splits(pool, sets, args,
                                                                             seed)))
                for seed in args.seeds}
    train_all(args, table_of, args.seeds)
    results, nearness = measure_all(args, args.seeds, table_of, sets, pool, horse)
    paired = comparisons(results)  # the one look
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                           capture_output=True, text=True).stdout.strip()
    setup = {"machine": sweep.machine() + (" (with uncommitted changes)" if dirty else ""),
             "command": "python benchmarks/positive_control.py "
             + " ".join(sys.argv[1:]), "seeds": args.seeds, "train_steps": args.train_steps,
             "batch_size": args.batch_size, "shots": args.shots, "half_width_goal": HALF_WIDTH,
             "seed_count_from": f"the sweep's largest phase-1 paired sd {sd:.4f}",
             "primary_metric": sweep.PRIMARY, "contrasts": CONTRASTS,
             "horse_negatives": len(os.listdir(horse)),
             "evaluation_sets": {k: len(v) for k, v in sets.items()},
             "total_minutes": (time.time() - t0) / 60}
    configs = {name: describe(flags) for name, (flags, _) in rows("horse", "rotations").items()}
    configs[OE] = {**configs[REAL], "outlier_exposure": 0.5, "outliers": "horse"}
    runs = [{"config": {"row": name, **configs[name]}, "seed": seed, "metrics": m}
            for name in results for seed, m in sorted(results[name].items())]
    paired = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in c.items()}
              for c in paired]  # JSON has no NaN (a zero-spread difference has no p-value)
    path = os.path.join(HERE, "results", ("smoke-" if args.smoke else "") + "positive_control")
    data.write_text(path + ".json", json.dumps({"setup": setup, "nearness": nearness,
                                                "runs": runs, "paired": paired}, indent=1))
    md = markdown(setup, results, paired, nearness)
    data.write_text(path + ".md", md)
    plot(paired, sweep_json, path + ".png")
    print(md)


if __name__ == "__main__":
    main()
