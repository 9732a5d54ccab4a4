"""
benchmarks/probe_fix.py -- the positive control's MSP figures again, with the linear probe that
leaves out features that do not vary (train.probe_standardisation), beside the old probe on the
same encoders.

The positive control (positive_control.py: 35 seeds at 12b29bc, one look) measured (c): outlier
exposure (Hendrycks et al. 2019, Eq. 1: the probe also learns a uniform softmax on outliers)
with 600 horse photographs raises the MSP AUROC of cat+dog by +0.083 over real only. Its probe
divided each feature by its training std floored at 1e-6, so a dead ReLU unit (std 0) kept its
random initial weight times up to 1e6, and any test image that woke it got a near one-hot
softmax: every MSP number is suspect. The fix changes the probe alone, so the encoders need no
change: real only's encoder of each seed, four probes on its features.

Fixed before running:
  Runs      real only of positive_control.py (its setup: CIFAR-10 JPEGs, 7 classes of 50 images,
            the small CNN, 300 steps), seeds 0-34, trained at this commit (the seed rule changed
            since 12b29bc, so the encoders are not 12b29bc's).
  Probes    on each encoder: {old: std floored at 1e-6, new: quiet features left out} x
            {no outliers, outlier exposure with the horse images at lambda 0.5}, each seeded by
            the run's seed, 100 epochs (train.train_linear, as the run's own probe).
  Reported  MSP AUROC (2,000 cat and dog test images against 7,000 ID test images) and test
            accuracy per probe; contrast (c), outlier exposure minus no outliers, under each
            probe; new minus old for each; mean and 95% t-interval over the 35 paired seeds;
            features that are dead (std 0) and quiet (left out) on the probe's images.
  Reading   A new-minus-old interval away from 0 says the old probe's dead units moved the MSP
            figures; (c) under the new probe is the figure the README states from now on.

Run:  python benchmarks/probe_fix.py             # about an hour on 2 cores (35 runs, 2 at a time)
      python benchmarks/probe_fix.py --seeds 0 1 --train-steps 20 --smoke --out runs/smoke
      python benchmarks/probe_fix.py --runs runs/<name> ...   # old and new probe on finished runs
Runs go to runs/positive_control/ (shared with positive_control.py: finished runs are reused);
results to benchmarks/results/probe_fix.{json,md}. Needs .data/cifar10 (extract
../shared/data/cifar10-jpeg.tar.gz into .data).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import data  # noqa: E402
import evaluate  # noqa: E402
import near_ood_sweep as sweep  # noqa: E402  (the setup and the paired statistics)
import positive_control as control  # noqa: E402  (its rows, horse folder and parser)
import train  # noqa: E402

SEEDS = list(range(35))  # the positive control's
PROBES = {"old": lambda f: (f.mean(0), f.std(0).clamp(min=1e-6),  # 1d48b65's standardisation
                            torch.zeros(f.shape[1], dtype=torch.bool)),
          "new": train.probe_standardisation}
METRIC = "test_msp_auroc"


@contextlib.contextmanager
def probe_rule(rule):
    """train.train_linear standardises by `rule` within the block."""
    kept = train.probe_standardisation
    train.probe_standardisation = rule
    try:
        yield
    finally:
        train.probe_standardisation = kept


def measure(run_dir, sets, splits, horse):
    """{row: metrics} of one seed's encoder: the four probes, and its dead and quiet features."""
    device = torch.device("cpu")
    args, splits, model, _, mean, std = evaluate.load_run(run_dir, device, splits=splits)
    feats = lambda images: evaluate.extract_features(model, images, mean, std, device)  # noqa
    train_f, outliers = feats(splits.train.images), feats(horse.images)
    test_in, test_out = feats(sets["test_id"].images), feats(sets["test_ood"].images)
    settings = argparse.Namespace(linear_epochs=100, outlier_exposure=0.5)
    rows = {}
    for probe, rule in PROBES.items():
        for oe in (False, True):
            with probe_rule(rule):
                classifier = train.train_linear(settings, train_f, splits.train.labels,
                                                len(splits.classes), device, args.seed,
                                                outliers if oe else None)
            with torch.no_grad():
                logits_in, logits_out = classifier(test_in), classifier(test_out)
            auroc = evaluate.ood_metrics(evaluate.msp_score(logits_in),
                                         evaluate.msp_score(logits_out))["auroc"]
            accuracy = float((logits_in.argmax(1) == sets["test_id"].labels).float().mean())
            rows[f"{'outlier exposure' if oe else 'no outliers'}, {probe} probe"] = {
                METRIC: auroc, "test_accuracy": accuracy}
    features = {"dead": int((train_f.std(0) == 0).sum()),
                "quiet": int(train.probe_standardisation(train_f)[2].sum()),
                "of": train_f.shape[1]}
    return rows, features


def contrasts(results):
    """(c) under each probe, and new minus old for each row; paired over seeds."""
    pairs = [(f"outlier exposure, {p} probe", f"no outliers, {p} probe") for p in PROBES]
    pairs += [(f"{row}, new probe", f"{row}, old probe")
              for row in ("no outliers", "outlier exposure")]
    return [c for row, versus in pairs for metric in (METRIC, "test_accuracy")
            for c in sweep.paired(results, [row], versus, metric)]


def markdown(setup, results, paired, features):
    lines = [f"Machine: {setup['machine']}. Command: `{setup['command']}`. Seeds "
             f"{setup['seeds'][0]}-{setup['seeds'][-1]} ({len(setup['seeds'])}); "
             f"{setup['minutes']:.0f} min.", "",
             "| row | MSP AUROC, cat+dog | test accuracy |", "|---|---|---|"]
    for name, per_seed in results.items():
        cells = [np.array([m[k] for m in per_seed.values()]) for k in (METRIC, "test_accuracy")]
        lines.append(f"| {name} | " + " | ".join(f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"
                                                for v in cells) + " |")
    lines += ["", "Paired differences over seeds, mean [95% t-interval]:", "",
              "| row | versus | metric | difference | p |", "|---|---|---|---|---|"]
    for c in paired:
        p = "-" if c["p"] is None or c["p"] != c["p"] else format(c["p"], ".2g")
        lines.append(f"| {c['config']} | {c['versus']} | {c['metric']} | {c['mean_delta']:+.4f} "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {p} |")
    dead = np.array([f["dead"] for f in features.values()])
    quiet = np.array([f["quiet"] for f in features.values()])
    width = next(iter(features.values()))["of"]
    lines += ["", f"Features of the {width} the probe reads: dead (std 0 on the probe's images) "
              f"{dead.mean():.1f} per seed (range {dead.min()}-{dead.max()}); left out by the new "
              f"probe (quiet) {quiet.mean():.1f} (range {quiet.min()}-{quiet.max()})."]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs):
    """--runs: the old and the new probe on each finished run's encoder, fitted as the run's own
    probe was (its probe images, --linear-epochs and seed; no outliers), scored on its held-out
    classes: a markdown table of MSP AUROC and test accuracy."""
    device = torch.device("cpu")
    lines = ["| run | probe | test accuracy | MSP AUROC, held-out classes | dead / quiet features |",
             "|---|---|---|---|---|"]
    for run_dir in run_dirs:
        args, splits, model, _, mean, std = evaluate.load_run(run_dir, device)
        probe_set = data.training_set(args, splits)[0].probe_set()  # real (+ ID) images
        feats = lambda images: evaluate.extract_features(model, images, mean, std, device)  # noqa
        f, test_in, test_out = (feats(s.images) for s in (probe_set, splits.test, splits.ood_test))
        settings = argparse.Namespace(linear_epochs=args.linear_epochs, outlier_exposure=0.0)
        dead = f"{int((f.std(0) == 0).sum())} / {int(train.probe_standardisation(f)[2].sum())}"
        for probe, rule in PROBES.items():
            with probe_rule(rule):
                classifier = train.train_linear(settings, f, probe_set.labels,
                                                len(splits.classes), device, args.seed)
            with torch.no_grad():
                logits_in, logits_out = classifier(test_in), classifier(test_out)
            auroc = evaluate.ood_metrics(evaluate.msp_score(logits_in),
                                         evaluate.msp_score(logits_out))["auroc"]
            accuracy = float((logits_in.argmax(1) == splits.test.labels).float().mean())
            lines.append(f"| {run_dir} | {probe} | {accuracy:.4f} | {auroc:.4f} | {dead} |")
    print("\n".join(lines))


def main():
    parser = control.build_parser()
    parser.description = __doc__
    parser.add_argument("--runs", nargs="+", metavar="RUN", default=None,
                        help="instead of the study: the old and the new probe on these finished "
                             "runs' encoders (e.g. the main job's)")
    args = parser.parse_args()
    if args.runs:
        return compare_runs(args.runs)
    if not args.smoke and (args.seeds != SEEDS or args.train_steps != 300):
        raise SystemExit("--seeds and --train-steps are fixed by the design; pass --smoke to try "
                         "others")
    seeds, args.folder = args.seeds, os.path.normpath(args.folder)
    t0 = time.time()
    sweep.check_settings(args)  # a folder made with other run-shaping options is refused
    sweep.prepare_folder(args)
    sets, pool = sweep.evaluation_sets(args)
    sweep.free_folder(args, sets)  # seeds 10 and up draw from the folder without validation
    horse = control.horse_folder(args)
    flags = control.rows(horse, None)[control.REAL]  # real only: ([], None)
    control.train_all(args, {seed: {control.REAL: flags} for seed in seeds}, seeds)
    results, features = {}, {}
    for seed in seeds:
        splits = sweep.seed_splits(pool, sets, args, seed)
        negatives = data.read_negative_data(horse, splits)  # as train.py reads them
        rows, features[seed] = measure(sweep.run_folder(args, seed, control.REAL), sets, splits,
                                       negatives)
        for name, m in rows.items():
            results.setdefault(name, {})[seed] = m
    paired = contrasts(results)  # the one look
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                           capture_output=True, text=True).stdout.strip()
    setup = {"machine": sweep.machine() + (" (with uncommitted changes)" if dirty else ""),
             "command": "python benchmarks/probe_fix.py " + " ".join(sys.argv[1:]),
             "seeds": seeds, "minutes": (time.time() - t0) / 60}
    paired = [{k: (None if isinstance(v, float) and v != v else v) for k, v in c.items()}
              for c in paired]  # JSON has no NaN
    path = os.path.join(HERE, "results", ("smoke-" if args.smoke else "") + "probe_fix")
    data.write_text(path + ".json", json.dumps({"setup": setup, "results": results,
                                                "features": features, "paired": paired},
                                               indent=1))
    md = markdown(setup, results, paired, features)
    data.write_text(path + ".md", md)
    print(md)


if __name__ == "__main__":
    main()
