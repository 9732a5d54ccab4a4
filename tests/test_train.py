"""train.py: every loss learns, resume is exact, bad arguments are refused, runs write their files."""

import json
import os

import pytest
import torch

import data
import supcon
import train
from helpers import assert_same_weights, stop_at_call

TINY = ["--examples-per-class", "12", "--epochs", "2", "--batch-size", "48", "--linear-epochs", "3",
        "--device", "cpu"]


def step_loss(args, model, classifier, views, labels, negative_only, every_anchor):
    """What train.run's loop computes before backward: forward, then the run's loss."""
    loss_of = train.make_loss(args, torch.Generator().manual_seed(0))
    return loss_of(train.forward(args, model, classifier, views), labels, negative_only,
                   every_anchor, None)


@pytest.mark.parametrize("loss", ["supcon", "simclr", "triplet", "cosine", "ce"])
def test_each_loss_falls_on_a_fixed_batch(loss):
    args = train.with_defaults(train.build_parser().parse_args(
        ["--loss", loss, "--margin", "0.5" if loss != "cosine" else "0.0"]))
    torch.manual_seed(0)
    s = data.load_data("digits", examples_per_class=8, ood_classes="")
    model, classifier = supcon.build_model(args.model, args.loss, 1, 16, 10)
    model.eval()  # no dropout noise: the same batch gives the same loss
    params = list(model.parameters()) + list(classifier.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    mean, std = data.channel_stats(s.train.images)
    x = data.to_float(s.train.images, mean, std)
    views = torch.stack([x, x.flip(-1)], 1)  # (B, 2, C, H, W): two fixed views
    neg = torch.zeros(len(x), dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        value = step_loss(args, model, classifier, views, s.train.labels, neg, neg)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("loss", ["supcon", "simclr", "triplet", "cosine", "ce"])
def test_every_loss_under_bf16_autocast_matches_fp32(loss):
    # train.run's loop runs the forward under bf16 autocast on CUDA; the CPU runs the same one.
    # The encoder's products round to bf16 (8-bit mantissa, about 0.4% per product, a few layers
    # deep), while every loss computes in fp32: the value stays within 3% of fp32's, it is an
    # fp32 scalar, and every gradient is finite. A loss computed in bf16 would come back bf16.
    args = train.with_defaults(train.build_parser().parse_args(["--loss", loss]))
    torch.manual_seed(0)
    s = data.load_data("digits", examples_per_class=8, ood_classes="")
    model, classifier = supcon.build_model(args.model, args.loss, 1, 16, 10)
    model.eval()  # no dropout: both precisions see the same network
    mean, std = data.channel_stats(s.train.images)
    x = data.to_float(s.train.images, mean, std)
    views = torch.stack([x, x.flip(-1)], 1)  # (B, 2, C, H, W)
    neg = torch.zeros(len(x), dtype=torch.bool)
    if loss != "ce":  # a quarter of the images as negatives, half of them meant for every anchor
        neg[::4] = True
    every = neg & (torch.arange(len(x)) % 8 == 0)
    full = step_loss(args, model, classifier, views, s.train.labels, neg, every)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = step_loss(args, model, classifier, views, s.train.labels, neg, every)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half.item() == pytest.approx(full.item(), rel=0.03), (loss, half.item(), full.item())
    half.backward()
    grads = [p.grad for p in [*model.parameters(), *classifier.parameters()] if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_default_run_writes_its_folder(tmp_path):
    results = train.main(TINY + ["--out", str(tmp_path), "--name", "r"])
    run = tmp_path / "r"
    for name in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt", "model.pt"):
        assert (run / name).exists(), name
    assert not any(".tmp" in p.name for p in run.iterdir())  # no temporary left behind
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    saved = json.loads((run / "metrics.json").read_text())
    assert 0 <= saved["test_accuracy"] <= 1 and 0 <= saved["ood_auroc_knn"] <= 1
    assert saved == json.loads(json.dumps(results))  # what was printed is what was saved
    assert (run / "report.md").exists() and (run / "tsne.png").exists()
    # checkpoints hold tensors and plain containers only: weights_only loading works
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 0
    with pytest.raises(data.DataError, match="already exists; choose another --name"):
        train.main(TINY + ["--out", str(tmp_path), "--name", "r"])


@pytest.mark.parametrize("data_on", ["device", "host"])
def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, data_on):
    # 6 steps an epoch; with --data-on host the resumed epoch's loader starts at the cut step
    args = TINY + ["--epochs", "3", "--batch-size", "16", "--data-on", data_on, "--out", str(tmp_path)]
    train.main(args + ["--name", "straight"])

    real_loss = stop_at_call(monkeypatch, train, "forward", 9)  # step 2 of the 2nd epoch
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--name", "cut"])
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # 1 epoch + 2 steps done
    monkeypatch.setattr(train, "forward", real_loss)
    train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    assert_same_weights(tmp_path / "straight", tmp_path / "cut", ("model", "classifier"))


@pytest.mark.parametrize("loss", ["supcon", "ce"])
def test_eval_every_logs_probe_accuracy_and_changes_no_weight(tmp_path, loss):
    args = TINY + ["--loss", loss, "--epochs", "2", "--no-report", "--out", str(tmp_path)]
    plain = train.main(args + ["--name", "plain"])
    probed = train.main(args + ["--name", "probed", "--eval-every", "1"])
    records = [json.loads(line) for line in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["probe_accuracy"] <= 1 for r in records)
    assert records[0]["minutes"] <= records[1]["minutes"]
    # the last probe is the same probe as the end of the run: the same accuracy
    assert records[-1]["probe_accuracy"] == pytest.approx(probed["test_accuracy"], abs=1e-6)
    # probing draws from its own random state: the trained weights are those of a run without it
    assert_same_weights(tmp_path / "plain", tmp_path / "probed")
    assert plain["test_accuracy"] == probed["test_accuracy"]


# (extra flags, steps per epoch at --batch-size 16): SupCon, and dataset-scope triplets, whose
# (T, 3) batches go through the same step, interrupt and divergence handling
LOOPS = [([], 6), (["--loss", "triplet", "--mining-scope", "dataset"], 20)]


@pytest.mark.parametrize("extra,per_epoch", LOOPS)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, extra,
                                                             per_epoch):
    real_loss, calls = train.forward, {"n": 0}

    def nan_at_epoch_2_step_1(*a, **k):
        calls["n"] += 1
        value = real_loss(*a, **k)
        return value * float("nan") if calls["n"] == per_epoch + 2 else value

    monkeypatch.setattr(train, "forward", nan_at_epoch_2_step_1)
    with pytest.raises(train.Diverged, match="epoch 2, step 1.*last good checkpoint"):
        train.main(TINY + extra + ["--batch-size", "16", "--out", str(tmp_path), "--name", "nan"])
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    real_loss = train.forward
    monkeypatch.setattr(train, "forward", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(train.Diverged, match="epoch 1, step 0.*no checkpoint was written yet"):
        train.main(TINY + ["--batch-size", "16", "--out", str(tmp_path), "--name", "nan"])
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.parametrize("mining", ["random", "batch_hard"])
def test_dataset_triplets_resume_after_ctrl_c_like_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                         mining):
    # batch_hard's triplets depend on the weights: a resumed epoch must use the triplets mined
    # at its start (kept in the checkpoint), not mine again on the weights of the stop
    args = TINY + LOOPS[1][0] + ["--mining", mining, "--batch-size", "16", "--no-report",
                                 "--out", str(tmp_path)]
    train.main(args + ["--name", "straight"])
    # step 2 of the second epoch (20 triplet batches an epoch)
    real_loss = stop_at_call(monkeypatch, train, "forward", 23)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--name", "cut"])
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    monkeypatch.setattr(train, "forward", real_loss)
    train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    assert_same_weights(tmp_path / "straight", tmp_path / "cut")


@pytest.mark.parametrize("argv,message", [
    (["--loss", "ce", "--negatives", "near_ood"], "contrastive loss"),
    (["--loss", "supcon", "--mining-scope", "dataset"], "triplet"),
    (["--synthetic", "somewhere"], "not used"),
    (["--synthetic", "somewhere", "--negative-data", "photos"], "not used"),  # outliers: photos
])
def test_bad_argument_combinations(argv, message, tmp_path):
    with pytest.raises(data.DataError, match=message):
        train.main(argv + ["--out", str(tmp_path)])


def test_trains_on_an_image_folder_with_synthetic_negatives(tmp_path):
    # a tiny RGB folder and a manifest of synthetic images: the near-OOD ones are negative-only
    from test_data import write_folder, write_manifest
    write_folder(tmp_path / "imgs", per_class=8, size=16)
    write_manifest(str(tmp_path / "syn"), [(f"near_ood/ant/{i}.png", "ant", "near_ood") for i in range(4)]
                   + [(f"id/bee/{i}.png", "bee", "id") for i in range(4)])
    results = train.main(["--data", str(tmp_path / "imgs"), "--image-size", "16", "--ood-classes", "cat",
                          "--synthetic", str(tmp_path / "syn"), "--positives", "id",
                          "--negatives", "near_ood", "--negative-mode", "denominators",
                          "--epochs", "1", "--batch-size", "16",
                          "--linear-epochs", "2", "--device", "cpu", "--out", str(tmp_path), "--name", "f"])
    assert 0 <= results["test_accuracy"] <= 1 and "ood_auroc_knn" in results


def test_the_data_line_counts_what_trains(tmp_path, capsys):
    # --no-real: the line says 0 real images and every synthetic one, not the unused real split
    from test_data import write_folder, write_manifest
    write_folder(tmp_path / "imgs", per_class=8, size=16)
    write_manifest(str(tmp_path / "syn"), [(f"near_ood/ant/{i}.png", "ant", "near_ood") for i in range(4)]
                   + [(f"id/{c}/{i}.png", c, "id") for c in ("ant", "bee") for i in range(3)])
    train.main(["--data", str(tmp_path / "imgs"), "--image-size", "16", "--ood-classes", "cat",
                "--synthetic", str(tmp_path / "syn"), "--positives", "id", "--negatives", "near_ood",
                "--no-real", "--epochs", "1", "--batch-size", "4", "--linear-epochs", "1",
                "--no-report", "--device", "cpu", "--out", str(tmp_path), "--name", "n"])
    out = capsys.readouterr().out
    assert "0 real training images, 10 synthetic (4 negative-only)" in out
    assert out.count("negatives used by --negative-mode score") == 1  # the default: it says so


@pytest.mark.parametrize("extra", [[], ["--loss", "triplet", "--mining-scope", "dataset"]])
def test_host_memory_path_trains_the_same_weights_as_the_device_path(tmp_path, extra):
    # --data-on host: DataLoader workers gather each batch from host memory; the views are still
    # made by the training loop's generator, so the run is the device path's, weight for weight
    args = TINY + extra + ["--no-report", "--out", str(tmp_path)]
    on_device = train.main(args + ["--name", "device", "--data-on", "device"])
    on_host = train.main(args + ["--name", "host", "--data-on", "host", "--workers", "2"])
    assert_same_weights(tmp_path / "device", tmp_path / "host")
    assert on_device["test_accuracy"] == on_host["test_accuracy"]


def test_host_batches_yields_each_ranks_share_from_the_first_step():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2)
    batches = [torch.tensor([0, 1, 2, 3, 4]), torch.tensor([9, 8, 7]), torch.tensor([[5, 6, 7]])]
    got = [x[:, 0, 0, 0].tolist() for x in data.host_batches(images, batches, first=1, rank=1, world=2,
                                                              workers=1)]
    # batch 1 split over 2 ranks: rank 1 gets [7]; the (1, 3) triplet batch: rank 1's share is empty
    assert got == [[7], []]
    got = [x[:, 0, 0, 0].tolist() for x in data.host_batches(images, batches, workers=0)]
    assert got == [[0, 1, 2, 3, 4], [9, 8, 7], [5, 6, 7]]


def test_data_on_auto_keeps_a_set_in_host_memory_when_it_would_fill_the_gpu(monkeypatch):
    args = train.build_parser().parse_args([])
    images = torch.zeros(1000, 3, 32, 32, dtype=torch.uint8)  # 3,072,000 bytes
    assert train.data_placement(args, images, torch.device("cpu")) == "device"  # one memory
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7_000_000, 80 * gib))
    assert train.data_placement(args, images, torch.device("cuda")) == "device"  # under half the free memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6_000_000, 80 * gib))
    assert train.data_placement(args, images, torch.device("cuda")) == "host"  # half or more
    args.data_on = "device"  # an explicit choice is kept
    assert train.data_placement(args, images, torch.device("cuda")) == "device"
