"""torchrun / DistributedDataParallel on CPU with 2 gloo processes: the gradients of a DDP step
equal those of one process on the same global batch (every loss, shards of unequal size), the
generation work is split across ranks into one manifest, and `torchrun train.py` runs end to end
with rank 0 alone writing the run folder."""

import copy
import datetime
import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

import dafusion
import data
import supcon
import train

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WORLD = 2
# (loss, extra flags): near-OOD negatives in both masking modes, the chunked path, every loss
CASES = [("supcon", []), ("supcon", ["--hard-negatives", "all", "--chunk-size", "4"]),
         ("simclr", []), ("triplet", ["--mining", "random"]), ("triplet", ["--mining", "batch_hard"]),
         ("cosine", []), ("ce", [])]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_gradients_match(rank, loss, flags):
    """One DDP step on this rank's shard vs. one process on the whole batch (computed here too)."""
    args = train.with_defaults(train.build_parser().parse_args(["--loss", loss, *flags]))
    torch.manual_seed(0)  # the same model, batch and labels on both ranks
    model, classifier = supcon.build_model("cnn", loss, 1, 8, 3)
    model.eval()  # no dropout: both computations see the same function
    B = 11  # shards of 6 and 5 rows: the padding of gather_rows is exercised
    views = torch.randn(B, 2, 1, 8, 8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1])
    negative_only = torch.zeros(B, dtype=torch.bool)
    if loss != "ce":
        negative_only[[2, 7, 10]] = True
    # reference: one process, the whole global batch
    ref_model, ref_classifier = copy.deepcopy(model), copy.deepcopy(classifier)
    ref_params = list(ref_model.parameters()) + (list(ref_classifier.parameters()) if loss == "ce" else [])
    roles = (labels, negative_only, torch.zeros(B, dtype=torch.bool))
    ref_loss = train.make_loss(args, torch.Generator().manual_seed(0))(
        train.forward(args, ref_model, ref_classifier, views), *roles, None)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    # DDP: this rank embeds its shard only; DDP averages the gradients over the ranks
    net = DistributedDataParallel(model)
    head = DistributedDataParallel(classifier) if loss == "ce" else classifier
    sizes = [len(part) for part in torch.arange(B).tensor_split(WORLD)]
    start = sum(sizes[:rank])
    value = train.make_loss(args, torch.Generator().manual_seed(0))(
        train.forward(args, net, head, views[start:start + sizes[rank]], sizes), *roles, sizes)
    value.backward()
    params = list(model.parameters()) + (list(classifier.parameters()) if loss == "ce" else [])
    whole = value.detach().clone()
    torch.distributed.all_reduce(whole)  # the loss train.py reports: the mean over ranks
    assert torch.allclose(whole / WORLD, ref_loss.detach(), rtol=1e-5, atol=1e-6), (loss, flags)
    for p, g in zip(params, ref_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), (loss, flags, (p.grad - g).abs().max())
    assert ref_loss.item() > 0


def generation_is_shared(rank, out):
    """run_jobs under 2 ranks: each image made once, by one rank; one manifest lists them all."""
    s = data.load_data("digits", examples_per_class=2, ood_classes="")
    jobs = dafusion.plan_jobs(s.train, s.train.names, 2, 0.2, [0.5], seed=0)
    made = []

    def make_images(batch):
        made.extend(j.path for j in batch)
        return [Image.new("L", (8, 8), color=j.index) for j in batch]

    dafusion.run_jobs(out, jobs, s.train.classes, "test", make_images, batch_size=3)
    with open(os.path.join(out, f"made-{rank}.json"), "w") as f:
        json.dump(made, f)
    data.barrier()
    if rank == 0:  # what generate() does after run_jobs: the final manifest
        dafusion.write_manifest(out, jobs, s.train.classes, "test")
    data.barrier()
    with open(os.path.join(out, "made-0.json")) as f0, open(os.path.join(out, "made-1.json")) as f1:
        made0, made1 = json.load(f0), json.load(f1)
    assert made0 and made1 and not set(made0) & set(made1)  # both worked, nobody twice
    assert sorted(made0 + made1) == sorted(j.path for j in jobs)
    with open(os.path.join(out, "manifest.csv")) as f:
        assert len(f.read().splitlines()) == 1 + len(jobs)


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        for loss, flags in CASES:
            ddp_gradients_match(rank, loss, flags)
        generation_is_shared(rank, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gradients_equal_one_process_and_generation_is_shared(tmp_path):
    # a failed assertion on either rank fails the test (spawn re-raises it here)
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)


def test_torchrun_train_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_port", str(free_port()), "train.py", "--examples-per-class", "12", "--epochs", "2",
               "--batch-size", "48", "--linear-epochs", "3", "--device", "cpu", "--no-report",
               "--out", str(tmp_path), "--name", "ddp"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "ddp"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # one line per epoch, rank 0 only
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1
    assert done.stdout.count("test accuracy") == 1  # rank 1 prints nothing
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
