"""
benchmarks/experiments.py -- the seed projects' research questions, measured on digits.

  fruit    the fruit project's setups with its CNN and cross-entropy: real only, synthetic only,
           real + synthetic, pre-train on synthetic then fine-tune on real.
  siamese  the Siamese project: cosine pairs vs triplets x augment none / rotation / simclr
           (t-SNE pictures), and the triplet mining variants with k-NN and few-shot accuracy.
(The thesis's own question -- near-OOD images as negatives -- is benchmarks/near_ood_sweep.py.)

Every run is a normal `train.py` run (folders under runs/experiments/<experiment>/); the synthetic
sets come from train.py's cache. Extra train.py arguments after `--` apply to every run; give
`--train-steps N` when the rows' training sets differ in size, so that they get the same compute:
    python benchmarks/experiments.py fruit --seeds 0 1 2 -- --train-steps 600
    python benchmarks/experiments.py siamese --seeds 0
Prints a markdown table (with the machine and wall times) and writes it to benchmarks/results/.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

def machine():
    """The machine, torch and the commit the numbers come from."""
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    where = f"{gpu} (CUDA)" if gpu else f"CPU {cpu}, {os.cpu_count()} cores"
    return f"{where}, torch {torch.__version__}, commit {commit}"


def run(out, name, argv):
    """One train.py run in out/name (replaced if it exists); returns (metrics, wall seconds)."""
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    metrics = train.main(argv + ["--out", out, "--name", name])
    return metrics, time.time() - t0


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"


def fruit(args, extra):
    out = os.path.join("runs", "experiments", "fruit")
    base = ["--loss", "ce", "--model", "cnn", "--no-report"] + extra
    setups = [("real only", []), ("synthetic only (ID)", ["--positives", "id", "--no-real"]),
              ("real + synthetic (ID)", ["--positives", "id"])]
    rows = ["| setup | test accuracy | macro F1 | ROC-AUC (OvR) | OOD AUROC (MSP) | optimiser steps | wall time |",
            "|---|---|---|---|---|---|---|"]
    raw = {}
    for seed in args.seeds:
        for label, flags in setups + [("pre-train on synthetic, fine-tune on real", None)]:
            if flags is None:  # fine-tune the synthetic-only run on the real images
                flags = ["--init-from", os.path.join(out, f"synthetic-only-seed{seed}")]
            name = label.split(" (")[0].replace(" ", "-").replace(",", "") + f"-seed{seed}"
            metrics, seconds = run(out, name, flags + ["--seed", str(seed)] + base)
            lin = metrics["classification"]["linear"]
            raw.setdefault(label, []).append({"accuracy": lin["accuracy"], "f1": lin["f1"], "roc_auc": lin["roc_auc"],
                                              "ood_auroc_msp": metrics.get("ood_auroc_msp"), "seconds": seconds,
                                              "steps": metrics["optimizer_steps"]})
    for label, results in raw.items():
        rows.append(f"| {label} | {mean_std([r['accuracy'] for r in results])} | {mean_std([r['f1'] for r in results])} | "
                    f"{mean_std([r['roc_auc'] for r in results])} | {mean_std([r['ood_auroc_msp'] for r in results])} | "
                    f"{steps(results)} | {np.mean([r['seconds'] for r in results]):.0f} s |")
    return rows, raw


def siamese(args, extra):
    out = os.path.join("runs", "experiments", "siamese")
    rows = ["| loss | augment | test accuracy (linear) | k-NN accuracy | 1-shot (prototype) | 5-shot (prototype) | optimiser steps | wall time |",
            "|---|---|---|---|---|---|---|---|"]
    raw, pictures = {}, []
    for loss in ("cosine", "triplet"):
        for augment in ("none", "rotation", "simclr"):
            name = f"{loss}-{augment}"
            metrics, seconds = run(out, name, ["--loss", loss, "--augment", augment, "--seed", str(args.seeds[0])] + extra)
            raw[name] = metrics
            pictures.append((f"{loss}, augment {augment}", os.path.join(out, name, "tsne.png")))
            rows.append(f"| {loss} | {augment} | {metrics['test_accuracy']:.4f} | {metrics['knn_accuracy']:.4f} | "
                        f"{fs(metrics, '1-shot')} | {fs(metrics, '5-shot')} | {metrics['optimizer_steps']} | {seconds:.0f} s |")
    rows += ["", "| triplet mining | test accuracy (linear) | k-NN accuracy | 1-shot (prototype) | 5-shot (prototype) | OOD AUROC (k-NN) | optimiser steps | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for mining, scope in [(m, "batch") for m in ("random", "batch_hard", "hard_negative", "semi_hard", "mixed")] + [("random", "dataset"), ("batch_hard", "dataset")]:
        name = f"triplet-{mining}-{scope}"
        metrics, seconds = run(out, name, ["--loss", "triplet", "--mining", mining, "--mining-scope", scope,
                                           "--seed", str(args.seeds[0]), "--no-report"] + extra)
        raw[name] = metrics
        rows.append(f"| {mining} ({scope}) | {metrics['test_accuracy']:.4f} | {metrics['knn_accuracy']:.4f} | "
                    f"{fs(metrics, '1-shot')} | {fs(metrics, '5-shot')} | {metrics.get('ood_auroc_knn', float('nan')):.4f} | "
                    f"{metrics['optimizer_steps']} | {seconds:.0f} s |")
    sheet = tsne_sheet(pictures, os.path.join(HERE, "results", "siamese_tsne.png"))
    rows += ["", f"t-SNE pictures: `{os.path.relpath(sheet, os.path.join(HERE, '..'))}`"]
    return rows, raw


def steps(results):
    """One step count, or the range when seeds differ (they should not)."""
    counts = sorted({r["steps"] for r in results})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def fs(metrics, key):
    m = (metrics.get("few_shot") or {}).get(key)
    return f"{m['prototype']['mean']:.3f} ± {m['prototype']['ci95']:.3f}" if m else "-"


def tsne_sheet(pictures, path):
    from PIL import Image
    plt = data.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5))
    for ax, (title, file) in zip(axes.flat, pictures):
        ax.imshow(Image.open(file))
        ax.set_title(title, fontsize=13)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.save_figure(fig, path, dpi=80)
    return path


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["fruit", "siamese"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default=None, help="name of the results file (default: the experiment)")
    args = p.parse_args(argv)
    t0 = time.time()
    command = "python benchmarks/experiments.py " + " ".join(sys.argv[1:])
    tag = args.tag_name = args.tag or args.experiment
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    rows, raw = {"fruit": fruit, "siamese": siamese}[args.experiment](args, extra)
    header = [f"Machine: {machine()}. Command: `{command}`. Seeds: {args.seeds}. Total wall time "
              f"{(time.time() - t0) / 60:.1f} min (synthetic sets cached beforehand are not "
              f"regenerated).", ""]
    text = "\n".join(header + rows) + "\n"
    data.write_text(os.path.join(HERE, "results", f"{tag}.md"), text)
    data.write_text(os.path.join(HERE, "results", f"{tag}.json"),
                    json.dumps(raw, indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
