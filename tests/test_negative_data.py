"""train.py --negative-data: real photographs used only as negatives -- their roles, the anchors
they reach, how they ride on the batches, and the folders that are refused."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from test_data import write_folder
from test_inputs import assert_one_line, command

RUN = ["--image-size", "16", "--ood-classes", "cat", "--epochs", "1", "--batch-size", "8",
       "--linear-epochs", "2", "--device", "cpu", "--no-report"]
# this file is about the thesis's way; a run with negatives defaults to --negative-mode score
# (tests/test_negative_modes_be.py)
THESIS = ["--negative-mode", "denominators"]


def write_negatives(root, flat=3, ant=2, other=1, seed=5):
    """Random RGB photographs: `flat` in the folder itself, `ant` under ant/ (a training class),
    `other` under other/ (not a class), and files that are not images."""
    rng = np.random.default_rng(seed)
    for folder, n in (("", flat), ("ant", ant), ("other", other)):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                os.path.join(root, folder, f"n{i}.jpg"))
    open(os.path.join(root, ".DS_Store"), "w").close()  # hidden: never an image
    open(os.path.join(root, "notes.txt"), "w").close()  # not an image: counted, left out


@pytest.fixture
def folders(tmp_path):
    write_folder(tmp_path / "imgs", per_class=8, size=16)
    write_negatives(tmp_path / "neg")
    return str(tmp_path / "imgs"), str(tmp_path / "neg")


def test_roles_every_anchor_flags_and_what_stays_out(folders, tmp_path, capsys):
    imgs, neg = folders
    splits = data.load_data(imgs, image_size=16, ood_classes="cat")
    negatives = data.read_negative_data(neg, splits)
    assert "left out 1 file(s)" in capsys.readouterr().out  # notes.txt, said; .DS_Store hidden
    assert len(negatives) == 6 and bool(negatives.negative_only.all())
    assert bool((negatives.kind == data.KIND_NEGATIVE).all())
    by_name = {os.path.relpath(n, neg): bool(e) for n, e in zip(negatives.names, negatives.every_anchor)}
    # ant/ is a training class: its class's anchors only; the folder itself and other/: every anchor
    assert by_name == {"n0.jpg": True, "n1.jpg": True, "n2.jpg": True, "ant/n0.jpg": False,
                       "ant/n1.jpg": False, "other/n0.jpg": True}
    ant = splits.classes.index("ant")
    assert all(int(label) == ant for label, e in zip(negatives.labels, negatives.every_anchor) if not e)
    # a run: the log counts them, config.json records the folder, the probe never sees them
    results = train.main(["--data", imgs, "--negative-data", neg, *THESIS, *RUN, "--out", str(tmp_path / "runs"),
                          "--name", "r"])
    out = capsys.readouterr().out
    assert "6 real negatives from " + neg + " (4 of every anchor, 2 of their class's)" in out
    with open(tmp_path / "runs" / "r" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["negative_data"] == neg
    args = train.with_defaults(train.build_parser().parse_args(["--data", imgs, "--negative-data", neg, *THESIS, *RUN]))
    used, outliers = data.training_set(args, splits)
    assert int((used.kind == data.KIND_NEGATIVE).sum()) == 6 and len(outliers) == 6
    assert not bool((used.probe_set().kind == data.KIND_NEGATIVE).any())
    # the k-NN and Mahalanobis reference: the real training images alone
    assert results["reference_set"] == f"the {len(splits.train)} real training images"


def test_the_loss_gets_each_images_rule_and_negatives_ride_on_top(folders, monkeypatch):
    imgs, neg = folders
    seen = []  # (labels, negative_only, hard_negatives) of every supcon_loss call
    real_loss = train.supcon.supcon_loss

    def spy(z, labels, negative_only, **kw):
        seen.append((labels, negative_only, kw["hard_negatives"]))
        return real_loss(z, labels, negative_only, **kw)

    monkeypatch.setattr(train.supcon, "supcon_loss", spy)
    base = ["--data", imgs, *THESIS, *RUN, "--negatives-per-batch", "0.5"]
    args = train.with_defaults(train.build_parser().parse_args(base + ["--negative-data", neg]))
    splits = data.load_data(imgs, image_size=16, ood_classes="cat")
    used, _ = data.training_set(args, splits)
    train.main(base + ["--negative-data", neg, "--out", os.path.dirname(neg), "--name", "spy"])
    assert seen
    for labels, negative_only, hard in seen:
        # the labelled images, then round(8 x 0.5) = 4 negatives on top; every negative's rule:
        # ant/ ones their class's anchors only (True), the others every anchor (False)
        k = len(negative_only) - 4
        assert negative_only.tolist() == [False] * k + [True] * 4
        assert torch.is_tensor(hard) and hard.dtype == torch.bool
    flags = torch.cat([h[n] for _, n, h in seen])
    assert flags.any() and (~flags).any()  # both kinds rode on some batch
    # the labelled batches are those of the run without negatives
    without = train.with_defaults(train.build_parser().parse_args(base))
    plain = train.epoch_batches(without, splits.train, 0)
    ridden = train.epoch_batches(args, used, 0)
    for a, b in zip(plain, ridden):
        assert torch.equal(a, b[:len(a)]) and bool(used.negative_only[b[len(a):]].all())
    # an every-anchor negative can ride on any batch, whatever classes it holds
    every = torch.nonzero(used.every_anchor).squeeze(1)
    riders = torch.cat([b[len(a):] for a, b in zip(plain, ridden)])
    assert len(seen) == len(ridden)  # one epoch: one loss call per batch, in order
    for (_, negative_only, hard), batch in zip(seen, ridden):
        # the rule of each negative on the batch: its class's anchors unless meant for every one
        assert torch.equal(hard[negative_only], ~used.every_anchor[batch][negative_only])
    assert set(riders.tolist()) & set(every.tolist())


@pytest.mark.parametrize("case,needles", [
    ("missing", ["--negative-data", "no such folder"]),
    ("empty", ["--negative-data", "no images there"]),
    ("training copy", ["--negative-data", "training set", "renamed.png"]),
    ("test copy", ["--negative-data", "test set"]),
    ("ood test copy", ["--negative-data", "OOD test set"]),
    ("unreadable", ["broken.jpg", "cannot read"]),
    ("ce", ["--negative-data needs a contrastive loss"]),
    ("simclr with class folders", ["--loss simclr", "class sub-folders"]),
    ("triplet with class folders", ["--loss triplet", "class sub-folders"]),
    ("every anchor with class folders", ["--hard-negatives all", "class sub-folders"]),
])
def test_refused_in_one_line_leaving_no_run_folder(case, needles, folders, tmp_path, capsys):
    imgs, neg = folders
    extra = []
    splits = data.load_data(imgs, image_size=16, ood_classes="cat")
    if case == "missing":
        neg = str(tmp_path / "nowhere")
    elif case == "empty":
        neg = str(tmp_path / "empty")
        os.makedirs(os.path.join(neg, "ant"))
        open(os.path.join(neg, ".hidden.jpg"), "w").close()
    elif case.endswith("copy"):
        # a renamed copy of one of the run's images (content, not name): a leak
        part = {"training copy": splits.train, "test copy": splits.test,
                "ood test copy": splits.ood_test}[case]
        shutil.copy(part.names[1], os.path.join(neg, "other", "renamed.png"))
    elif case == "unreadable":
        with open(os.path.join(neg, "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff not really a jpeg")
    elif case == "ce":
        extra = ["--loss", "ce"]
    else:  # a loss or rule that sends every negative to every anchor: ant/ would mean nothing
        extra = {"simclr": ["--loss", "simclr"], "triplet": ["--loss", "triplet"],
                 "every": ["--hard-negatives", "all"]}[case.split()[0]]
    runs = tmp_path / "runs"
    code, err = command("train", ["--data", imgs, "--negative-data", neg, *THESIS, *RUN, *extra,
                                  "--out", str(runs)], capsys)
    assert_one_line(code, err, *needles)
    assert not runs.exists() or os.listdir(runs) == []  # no run folder left behind


def test_outlier_exposure_reads_the_negative_data_and_generates_nothing(folders, tmp_path, monkeypatch):
    imgs, neg = folders
    monkeypatch.chdir(tmp_path)  # a synthetic cache would appear here
    got = {}
    real = train.train_linear

    def spy(args, features, labels, num_classes, device, seed, outliers=None):
        got["outliers"] = None if outliers is None else len(outliers)
        return real(args, features, labels, num_classes, device, seed, outliers)

    monkeypatch.setattr(train, "train_linear", spy)
    train.main(["--data", imgs, "--negative-data", neg, "--outlier-exposure", "0.5", *THESIS, *RUN,
                "--out", str(tmp_path / "runs"), "--name", "oe"])
    assert got["outliers"] == 6  # the --negative-data images are the outliers
    assert not os.path.exists(tmp_path / ".cache")  # no synthetic set was made for it
