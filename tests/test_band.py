"""The nearness filter (evaluate.py --nearness DIR --band-of REAL): it keeps exactly the synthetic
near-OOD images whose k-NN score (k = 50) lies between the 5% and 95% quantiles of the real
near-OOD images' scores, checked against a brute-force loop over sorted distances and numpy's
quantile; copies them unchanged; and says so plainly when none survives."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dafusion
import data
import evaluate
import train

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SMALL = ["--examples-per-class", "10", "--batch-size", "16", "--linear-epochs", "2",
         "--device", "cpu", "--no-report"]  # 8 classes x 10 = 80 references: k = 50 stays 50


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A digits synthetic set (near-OOD at 0.5 and 0.9), a reference run on the same few-shot
    images, and a folder of 'real near-OOD' images: rotated, brightened digits test images, and
    copies of 20 of the set's own near-OOD images, so that the band surely splits the set (its
    two extremes lie outside their own 5%-95% band, the others inside)."""
    root = tmp_path_factory.mktemp("band")
    syn = str(root / "set")
    dafusion.main(["--out", syn, "--examples-per-class", "10", "--strengths", "0.5,0.9",
                   "--per-image", "1", "--ddpm-steps", "2"])
    train.main(SMALL + ["--train-steps", "3", "--out", str(root), "--name", "ref"])
    splits = data.splits_from_args(train.build_parser().parse_args(SMALL))
    real = root / "real"
    real.mkdir()
    for i, image in enumerate(splits.test.images[:20]):  # (C, H, W) uint8; C = 1
        turned = torch.rot90(image[0], 1, (0, 1)).clamp(max=250) + 5  # no digit's own pixels
        Image.fromarray(turned.numpy()).save(real / f"{i}.png")
    near = sorted(row["path"] for _, row in data.manifest_rows(syn) if row["kind"] == "near_ood")
    for i, path in enumerate(near[::len(near) // 20][:20]):  # both strengths
        Image.open(os.path.join(syn, path)).save(real / f"copy{i}.png")
    return syn, str(root / "ref"), str(real)


def kth_distance(train_f, f, k=50):
    """Brute force: the distance from each row of f to its k-th nearest row of train_f, both
    normalised (float64), by sorting every distance."""
    a = train_f.double().numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    out = []
    for row in f.double().numpy():
        row = row / np.linalg.norm(row)
        distances = sorted(float(np.sqrt(((row - b) ** 2).sum())) for b in a)
        out.append(distances[min(k, len(a)) - 1])
    return np.array(out)


def test_band_mask_matches_numpy_quantiles():
    g = torch.Generator().manual_seed(0)
    real, scores = torch.randn(37, generator=g), torch.randn(200, generator=g) * 2
    low, high, keep = evaluate.band_mask(real, scores)
    want_low, want_high = np.quantile(real.double().numpy(), [0.05, 0.95])  # linear, numpy's own
    assert (low, high) == pytest.approx((want_low, want_high), abs=1e-12)
    expect = [want_low <= s <= want_high for s in scores.double().tolist()]
    assert keep.tolist() == expect and 0 < sum(expect) < 200
    ends = torch.tensor([low, high, low - 1e-9, high + 1e-9], dtype=torch.float64)
    assert evaluate.band_mask(real, ends)[2].tolist() == [True, True, False, False]


def test_the_filter_keeps_what_the_brute_force_band_keeps(made, capsys):
    syn, run, real = made
    result = evaluate.main(["--nearness", syn, "--run", run, "--band-of", real])
    band = result["band"]
    # the independent computation: the run's encoder, the same images, brute-force k-NN
    args, splits, model, _, mean, std = evaluate.load_run(run, torch.device("cpu"))
    _, C, H, _ = splits.train.images.shape
    feats = lambda x: evaluate.extract_features(model, x, mean, std, "cpu")  # noqa: E731
    with torch.no_grad():
        train_f = feats(splits.train.images)
        real_set = data.read_negative_data(real, splits)
        s = data.read_manifest(syn, splits, H, C)
        near = s.subset(s.kind == data.KIND_NEAR_OOD)
        real_r, near_r = kth_distance(train_f, feats(real_set.images)), \
            kth_distance(train_f, feats(near.images))
    # the score is minus the distance: the band of scores is the band of distances, mirrored
    low, high = np.quantile(-real_r, [0.05, 0.95])
    assert (band["low"], band["high"]) == pytest.approx((low, high), abs=1e-5)
    assert evaluate.knn_k(50, len(train_f), "ood") == 50 < len(train_f)  # k is not cut to N
    margin = 1e-5  # float32 features against float64 sums: images this close to an end are
    sure_in = (-near_r >= low + margin) & (-near_r <= high - margin)  # not asserted either way
    sure_out = (-near_r < low - margin) | (-near_r > high + margin)
    assert sure_in.any() and sure_out.any()  # the band splits the set: both ways are tested
    names = {os.path.relpath(n, syn).replace(os.sep, "__") for n in near.names}  # every one
    files = set(os.listdir(band["folder"]))
    assert files <= names and len(files) == band["kept"]
    for s, (kept, n) in band["kept_by_strength"].items():  # each strength as the brute force
        at = np.isclose(near.strength.numpy(), float(s))
        assert n == at.sum() and sure_in[at].sum() <= kept <= n - sure_out[at].sum(), s
    for name, inside, outside in zip(near.names, sure_in, sure_out):
        copy = os.path.relpath(name, syn).replace(os.sep, "__")
        if inside:
            assert copy in files, name
            assert open(os.path.join(band["folder"], copy), "rb").read() == \
                open(name, "rb").read()  # copied unchanged
        if outside:
            assert copy not in files, name
    assert sure_in.sum() + sure_out.sum() >= len(near_r) - 2  # few near an end
    assert band["near_ood_images"] == len(near_r) and band["reference_images"] == 40
    assert sum(k for k, _ in band["kept_by_strength"].values()) == band["kept"]
    assert json.load(open(os.path.join(syn, "nearness.json")))["band"] == \
        json.loads(json.dumps(band))
    assert f"Kept {band['kept']} of {len(near_r)} synthetic near-OOD images" in \
        capsys.readouterr().out
    # the band folder is what train.py --negative-data reads: every image, every anchor
    negatives = data.read_negative_data(band["folder"], splits)
    assert len(negatives) == band["kept"] and negatives.every_anchor.all()


def test_a_band_nothing_falls_in_writes_nothing_and_says_so(made, tmp_path, capsys):
    syn, run, real = made
    evaluate.main(["--nearness", syn, "--run", run, "--band-of", real])  # a band that keeps some
    folder = os.path.join(syn, "near_ood_band")
    assert os.listdir(folder)
    one = tmp_path / "one"
    one.mkdir()
    for name in ("a.png", "b.png"):  # one image twice: the band is a single score
        Image.open(os.path.join(real, "0.png")).save(one / name)
    result = evaluate.main(["--nearness", syn, "--run", run, "--band-of", str(one)])
    assert result["band"]["kept"] == 0 and result["band"]["folder"] is None
    out = capsys.readouterr().out
    assert "none survives: nothing written" in out and "Kept 0 of" in out
    assert result["band"]["high"] == pytest.approx(result["band"]["low"], abs=1e-6)  # one score
    assert not os.path.exists(folder)  # the older band's folder no longer stands for this band


@pytest.mark.parametrize("argv, said", [
    (["--band-of", "{missing}"], "--band-of {missing}: no such folder"),
    (["--band-of", "{empty}"], "--band-of {empty}: no images there; give a folder of real "
                               "near-OOD photographs"),
    (["--band-of", "{known}"], "--band-of {known}: 1 of its images are images of this run's "
                               "training set"),
    ([], None),  # a control: the same call without --band-of runs
])
def test_band_of_refusals(made, tmp_path, argv, said):
    syn, run, _ = made
    missing, empty, known = (str(tmp_path / n) for n in ("nowhere", "empty", "known"))
    os.mkdir(empty)
    os.mkdir(known)
    splits = data.splits_from_args(train.build_parser().parse_args(SMALL))
    Image.fromarray(splits.train.images[0, 0].numpy()).save(os.path.join(known, "mine.png"))
    fill = lambda a: a.replace("{missing}", missing).replace(  # noqa: E731
        "{empty}", empty).replace("{known}", known)
    argv = [fill(a) for a in argv]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--nearness", syn,
                           "--run", run, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if said is None:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.strip().startswith("error: " + fill(said))


def test_band_of_needs_nearness(made, tmp_path):
    _, run, real = made
    done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), run, "--band-of",
                           real], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--band-of" in done.stderr
