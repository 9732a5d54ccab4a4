"""
benchmarks/cifar10_curve.py -- the full-size result: SupCon with ResNet-18 on CIFAR-10, linear-probe
test accuracy against minutes of training, as a curve (PNG) and a table (markdown).

One train.py run with --eval-every: every few epochs a fresh linear probe is trained on the frozen
encoder and its test accuracy written to metrics.jsonl, next to the training minutes so far (the
probes' own time is not counted). Meant for a GPU; the data is the CIFAR-10 JPEG folder of
../shared/data extracted to .data/cifar10 (see the README), all ten classes, no held-out class.

Run:   python benchmarks/cifar10_curve.py                          # the recipe below
       python benchmarks/cifar10_curve.py -- --epochs 200 --lr 0.5 # extra train.py arguments
       python benchmarks/cifar10_curve.py --from-run runs/NAME     # redraw a run's curve only
Writes benchmarks/results/cifar10_curve.{png,md}.
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import data  # noqa: E402
import train  # noqa: E402

# SupCon, ResNet-18 with the small-image stem, 32 px, batch 512 x 2 views, SGD with warm-up and
# cosine decay; a probe (50 epochs on frozen features, about 10 s on an H100) every 25 epochs.
# 125 epochs take about 6.5 minutes on one H100, which leaves the probes room inside one
# 10-minute job (a run stopped by a job limit continues with `train.py --resume runs/NAME`).
RECIPE = ["--data", ".data/cifar10", "--ood-classes", "", "--model", "resnet18", "--loss", "supcon",
          "--augment", "simclr", "--epochs", "125", "--batch-size", "512", "--optimizer", "sgd",
          "--lr", "0.4", "--weight-decay", "5e-4", "--warmup-epochs", "5", "--temperature", "0.1",
          "--eval-every", "25", "--linear-epochs", "50", "--no-report"]


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="cifar10-supcon-curve", help="run folder under runs/")
    p.add_argument("--from-run", default=None, metavar="RUN",
                   help="no training: draw the curve of the existing run folder RUN (also one that "
                        "stopped early; its metrics.jsonl is all that is needed)")
    p.add_argument("--machine", default=None, help="with --from-run: the machine the run trained on")
    args = p.parse_args(argv)
    command = "python benchmarks/cifar10_curve.py " + " ".join(sys.argv[1:])
    if args.from_run:
        run_dir, device = args.from_run, args.machine or "unknown machine"
        results_path = os.path.join(run_dir, "metrics.json")
        results = json.load(open(results_path)) if os.path.exists(results_path) else None
    else:
        run_dir = os.path.join("runs", args.name)
        results = train.main(RECIPE + extra + ["--name", args.name])
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f.read().splitlines()]
    records = [r for r in epochs if "probe_accuracy" in r]
    if results is not None:
        final = (f"Final linear-probe test accuracy {results['test_accuracy']:.4f} after "
                 f"{results['train_minutes']:.1f} min of training.")
    else:  # stopped early: say how far it got
        final = (f"The run did not finish (no metrics.json): it stopped after epoch {epochs[-1]['epoch']} "
                 f"at {epochs[-1]['minutes']:.2f} min of training; the table holds its probes.")
    rows = [f"Machine: {device}. Command: `{command}`. {final}", "",
            "| epoch | minutes of training | linear-probe test accuracy |", "|---|---|---|"]
    rows += [f"| {r['epoch']} | {r['minutes']:.2f} | {r['probe_accuracy']:.4f} |" for r in records]
    text = "\n".join(rows) + "\n"
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    data.write_text(os.path.join(HERE, "results", "cifar10_curve.md"), text)
    plt = data.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["minutes"] for r in records], [r["probe_accuracy"] for r in records], marker="o")
    ax.axhline(0.9, ls=":", c="grey", label="90%")
    ax.set(xlabel="minutes of training", ylabel="linear-probe test accuracy",
           title=f"SupCon ResNet-18 on CIFAR-10 ({device.split(',')[0]})"
                 + ("" if results is not None else f"\nrun stopped after epoch {epochs[-1]['epoch']}"))
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(HERE, "results", "cifar10_curve.png")
    data.save_figure(fig, path)
    print(f"curve: {path}")


if __name__ == "__main__":
    main()
