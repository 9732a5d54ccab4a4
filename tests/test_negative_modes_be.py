"""train.py --negative-mode score (b) and classes (e): the k-NN+neg score against a loop of its
equation, the loss of negatives-as-classes against a loop of Eq. 2 over the extended labels, and
tiny runs of both modes end to end (what trains, what the probe and the references see, what
metrics.json and evaluate.py RUN report), with the refusals of the options that do nothing."""

import json
import math
import os
import shutil

import pytest
import torch
from sklearn.metrics import roc_auc_score

import data
import evaluate
import train
from helpers import assert_same_weights
from test_data import write_folder, write_manifest
from test_inputs import assert_one_line, command
from test_negative_data import RUN, write_negatives
from test_supcon import brute_force_supcon


@pytest.fixture
def folders(tmp_path):
    write_folder(tmp_path / "imgs", per_class=8, size=16)
    write_negatives(tmp_path / "neg")  # 3 in the folder, 2 under ant/, 1 under other/
    return str(tmp_path / "imgs"), str(tmp_path / "neg")


# -----------------------------------------------------------------------------
# (b) k-NN+neg: s(x) = -r_k(x; ID) + r_k'(x; negatives), k' = round(k M / N) in [1, M]

def kth_distance(query, references, k):
    """The distance from `query` to its k-th nearest reference, all L2-normalised: a loop."""
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    q = unit(query)
    distances = sorted(math.sqrt(sum((a - b) ** 2 for a, b in zip(q, unit(r))))
                       for r in references)
    return distances[k - 1]


@pytest.mark.parametrize("n_train,n_neg", [(80, 7), (30, 1), (12, 40), (200, 9)])
def test_knn_neg_score_is_its_equation(n_train, n_neg):
    g = torch.Generator().manual_seed(n_train + n_neg)
    train_f, neg_f, test_f = (torch.randn(n, 6, generator=g, dtype=torch.float64)
                              for n in (n_train, n_neg, 9))
    k = min(50, n_train)  # Sun et al.'s k = 50, or every reference of a smaller set
    k_neg = min(n_neg, max(1, math.floor(k * n_neg / n_train + 0.5)))  # the same share of M
    want = [-kth_distance(x, train_f.tolist(), k) + kth_distance(x, neg_f.tolist(), k_neg)
            for x in test_f.tolist()]
    got = evaluate.knn_neg_score(train_f, neg_f, test_f)
    assert got.tolist() == pytest.approx(want, abs=1e-5)  # knn_score computes in fp32
    # ood_scores adds it beside the k-NN score, whose first term it shares
    scores = evaluate.ood_scores(train_f, torch.zeros(n_train, dtype=torch.long), test_f,
                                 torch.zeros(9, 2), neg_f)
    assert torch.equal(scores[evaluate.KNN_NEG], got)
    assert evaluate.KNN_NEG not in evaluate.ood_scores(train_f, torch.zeros(n_train).long(),
                                                       test_f, torch.zeros(9, 2))


def test_score_mode_trains_as_without_negatives_and_reports_knn_neg(folders, tmp_path,
                                                                    monkeypatch):
    imgs, neg = folders
    runs = tmp_path / "runs"
    base = ["--data", imgs, *RUN, "--out", str(runs)]
    train.main(base + ["--name", "plain"])
    train.main(base + ["--negative-data", neg, "--negative-mode", "denominators",
                       "--negative-weight", "0", "--name", "w0"])
    seen = []  # negative_only of every loss call of the score run
    real_loss = train.supcon.supcon_loss
    monkeypatch.setattr(train.supcon, "supcon_loss",
                        lambda z, labels, negative_only, **kw: seen.append(negative_only)
                        or real_loss(z, labels, negative_only, **kw))
    results = train.main(base + ["--negative-data", neg, "--negative-mode", "score",
                                 "--name", "score"])
    assert seen and not any(bool(n.any()) for n in seen)  # no negative rode on any batch
    # the encoder trained as without negatives, bit for bit; as the w = 0 control up to the
    # float rounding of the extra -inf columns (w = 1 moves the weights by about 3e-3 here)
    assert_same_weights(runs / "plain", runs / "score")
    w0 = torch.load(runs / "w0" / "model.pt", weights_only=True)["model"]
    score = torch.load(runs / "score" / "model.pt", weights_only=True)["model"]
    assert all(torch.allclose(score[key], w0[key], rtol=0, atol=1e-5) for key in score)
    with open(runs / "score" / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["ood_auroc_knn_neg"] == results["ood_auroc_knn_neg"]
    held = metrics["ood"]["held-out classes cat"]
    assert held[evaluate.KNN_NEG]["auroc"] == metrics["ood_auroc_knn_neg"]
    assert held["k-NN"]["auroc"] == metrics["ood_auroc_knn"]  # the control, in the same run
    # the number, again from the saved encoder by the equation's loop and sklearn's AUROC
    _, splits, model, _, mean, std = evaluate.load_run(str(runs / "score"), torch.device("cpu"))
    negatives = data.read_negative_data(neg, splits)
    f = lambda s: evaluate.extract_features(model, s.images, mean, std, "cpu").tolist()  # noqa
    train_f, neg_f = f(splits.train), f(negatives)
    n, m = len(train_f), len(neg_f)
    k = min(50, n)
    k_neg = min(m, max(1, math.floor(k * m / n + 0.5)))
    assert metrics["knn_neg"] == {"score": metrics["knn_neg"]["score"], "k": k,
                                  "k_negatives": k_neg, "negatives": 6}
    s = lambda x: -kth_distance(x, train_f, k) + kth_distance(x, neg_f, k_neg)  # noqa: E731
    s_in, s_out = [s(x) for x in f(splits.test)], [s(x) for x in f(splits.ood_test)]
    auroc = roc_auc_score([1] * len(s_in) + [0] * len(s_out), s_in + s_out)  # ID positive
    assert metrics["ood_auroc_knn_neg"] == pytest.approx(auroc, abs=1e-6)


@pytest.mark.parametrize("argv,mode,lam", [
    ([], "denominators", 0.0),  # no negatives: the mode that adds nothing, no outliers
    (["--negatives", "near_ood"], "score", 0.5),
    (["--negative-data", "photos"], "score", 0.5),
    (["--negatives", "id"], "score", 0.0),  # the placebo: its ID images are no outliers
    (["--negatives", "near_ood", "--negative-mode", "denominators"], "denominators", 0.0),
    (["--negative-data", "photos", "--negative-mode", "head"], "head", 0.0),
    (["--negative-data", "photos", "--outlier-exposure", "1"], "score", 1.0),  # typed: wins
])
def test_the_defaults_the_readme_states(argv, mode, lam):
    args = train.with_defaults(train.build_parser().parse_args(argv))
    assert (args.negative_mode, args.outlier_exposure) == (mode, lam)


def test_negatives_default_to_the_score_with_outlier_exposure_and_the_thesis_keeps_its_name(
        folders, tmp_path, monkeypatch):
    # the negatives study's answer (README): typed nothing but --negative-data, the encoder
    # trains as without negatives and the probe learns outlier exposure on them at lambda 0.5;
    # --negative-mode denominators is the thesis's run, with no outlier exposure
    imgs, neg = folders
    runs = tmp_path / "runs"
    base = ["--data", imgs, *RUN, "--out", str(runs)]
    probes = {}  # run name: (lambda, outliers the probe saw)
    real = train.train_linear

    def spy(args, features, labels, num_classes, device, seed, outliers=None):
        probes[args.name] = (args.outlier_exposure, None if outliers is None else len(outliers))
        return real(args, features, labels, num_classes, device, seed, outliers)

    monkeypatch.setattr(train, "train_linear", spy)
    train.main(base + ["--name", "plain"])
    train.main(base + ["--negative-data", neg, "--name", "default"])
    train.main(base + ["--negative-data", neg, "--negative-mode", "denominators", "--name",
                       "thesis"])
    configs = {name: json.loads((runs / name / "config.json").read_text(encoding="utf-8"))
               for name in probes}
    assert (configs["default"]["negative_mode"], configs["default"]["outlier_exposure"]) == \
        ("score", 0.5)
    assert probes == {"plain": (0.0, None), "default": (0.5, 6), "thesis": (0.0, None)}
    assert (configs["thesis"]["negative_mode"], configs["plain"]["negative_mode"]) == \
        ("denominators", "denominators")  # without negatives: the mode that adds nothing
    assert_same_weights(runs / "plain", runs / "default")  # no negative in any batch
    plain = torch.load(runs / "plain" / "model.pt", weights_only=True)["model"]
    thesis = torch.load(runs / "thesis" / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(plain[k], thesis[k]) for k in plain)  # w = 1 moved the encoder


def test_evaluate_run_reads_the_negatives_again_or_refuses(folders, tmp_path, capsys):
    imgs, neg = folders
    run = tmp_path / "runs" / "score"
    trained = train.main(["--data", imgs, *RUN, "--negative-data", neg, "--negative-mode",
                          "score", "--out", str(tmp_path / "runs"), "--name", "score"])
    again = evaluate.evaluate_run(str(run), episodes=5, pictures=False)
    assert again["ood_auroc_knn_neg"] == trained["ood_auroc_knn_neg"]
    assert again["knn_neg"] == trained["knn_neg"]
    shutil.move(neg, str(tmp_path / "moved"))  # the run's negatives are gone
    code, err = command("evaluate", [str(run), "--no-pictures"], capsys)
    assert_one_line(code, err, str(run), "negatives", "k-NN+neg", "config.json")
    with open(run / "metrics.json", encoding="utf-8") as f:  # the run's numbers stay
        assert json.load(f)["ood_auroc_knn_neg"] == trained["ood_auroc_knn_neg"]


def test_score_mode_takes_class_sub_folders_with_any_contrastive_loss(folders, tmp_path):
    imgs, neg = folders  # ant/ holds negatives of a class: (a) refuses them with triplets
    results = train.main(["--data", imgs, *RUN, "--negative-data", neg, "--loss", "triplet",
                          "--negative-mode", "score", "--out", str(tmp_path / "runs")])
    assert "ood_auroc_knn_neg" in results and results["knn_neg"]["negatives"] == 6


# -----------------------------------------------------------------------------
# (e) negatives as classes: Eq. 2 over the labels K + g

def classes_args(*extra):
    return train.with_defaults(train.build_parser().parse_args(
        ["--negative-mode", "classes", *extra]))


@pytest.mark.parametrize("extra", [[], ["--chunk-size", "0"], ["--temperature", "0.5"]])
def test_classes_loss_is_eq2_over_the_extended_labels(extra):
    K = 3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 1, 1, 0, 2])  # 6 labelled, 4 negatives
    negative_only = torch.tensor([False] * 6 + [True] * 4)
    every_anchor = torch.tensor([False] * 8 + [True] * 2)  # 2 of class 1, 2 of every anchor
    z = torch.randn(10, 2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    args = classes_args(*extra)
    got = train.make_loss(args, None, K)(z, labels, negative_only, every_anchor, None)
    # the rule, written out: a negative meant for class c is K + c, for every anchor 2K
    extended = [int(y) if not n else 2 * K if e else K + int(y)
                for y, n, e in zip(labels, negative_only, every_anchor)]
    assert extended == [0, 0, 1, 1, 2, 2, 4, 4, 6, 6]
    assert train.negative_classes(labels, negative_only, every_anchor, K)[0].tolist() == extended
    want = brute_force_supcon(z, torch.tensor(extended), None, temperature=args.temperature)
    assert float(got) == pytest.approx(want, rel=1e-9)
    # not the thesis's loss: there the negatives are no anchors and the same z gives another
    thesis = brute_force_supcon(z, labels, negative_only, temperature=args.temperature,
                                hard_negatives=~every_anchor)
    assert abs(want - thesis) > 1e-3


def test_classes_mode_end_to_end_keeps_negatives_out_of_probe_and_references(
        folders, tmp_path, monkeypatch):
    imgs, neg = folders
    seen, probed = [], []
    real_loss, real_linear = train.supcon.supcon_loss, train.train_linear
    monkeypatch.setattr(train.supcon, "supcon_loss",
                        lambda z, labels, negative_only, **kw: seen.append(
                            (labels, negative_only)) or real_loss(z, labels, negative_only, **kw))
    monkeypatch.setattr(train, "train_linear",
                        lambda args, features, labels, *a, **kw: probed.append(labels)
                        or real_linear(args, features, labels, *a, **kw))
    results = train.main(["--data", imgs, *RUN, "--negative-data", neg, "--negative-mode",
                          "classes", "--negatives-per-batch", "1", "--out", str(tmp_path / "r")])
    splits = data.load_data(imgs, image_size=16, ood_classes="cat")
    K, ant = len(splits.classes), splits.classes.index("ant")
    assert seen
    for labels, negative_only in seen:
        assert not bool(negative_only.any())  # every row an anchor of Eq. 2
        assert int((labels >= K).sum()) == 8  # the 8 negatives on top, labelled K + g
    riders = set(torch.cat([labels[labels >= K] for labels, _ in seen]).tolist())
    assert riders == {K + ant, 2 * K}  # ant/'s group, and the every-anchor group
    # the probe: the real training images alone, on the K real classes
    assert len(probed) == 1 and len(probed[0]) == len(splits.train)
    assert torch.equal(probed[0].sort().values, splits.train.labels.sort().values)
    assert results["reference_set"] == f"the {len(splits.train)} real training images"
    assert "ood_auroc_knn_neg" in results  # k-NN+neg: every run with negatives reports it


def test_synthetic_negatives_are_classes_by_source_and_read_again(folders, tmp_path,
                                                                  monkeypatch):
    imgs, _ = folders
    syn = str(tmp_path / "syn")  # near-OOD variations of ant and bee images (and ID ones)
    write_manifest(syn, [(f"near_ood/{c}/{i}.png", c, "near_ood") for c in ("ant", "bee")
                         for i in range(3)] + [("id/ant/0.png", "ant", "id")])
    seen = []
    real_loss = train.supcon.supcon_loss
    monkeypatch.setattr(train.supcon, "supcon_loss",
                        lambda z, labels, negative_only, **kw: seen.append(labels)
                        or real_loss(z, labels, negative_only, **kw))
    runs = tmp_path / "runs"
    trained = train.main(["--data", imgs, *RUN, "--synthetic", syn, "--negatives", "near_ood",
                          "--negative-mode", "classes", "--negatives-per-batch", "1",
                          "--out", str(runs), "--name", "syn"])
    splits = data.load_data(imgs, image_size=16, ood_classes="cat")
    K = len(splits.classes)
    riders = set(torch.cat([labels[labels >= K] for labels in seen]).tolist())
    assert riders == {K + splits.classes.index("ant"), K + splits.classes.index("bee")}
    assert trained["knn_neg"]["negatives"] == 6  # the near-OOD ones, not the ID one
    again = evaluate.evaluate_run(str(runs / "syn"), episodes=5, pictures=False)
    assert again["ood_auroc_knn_neg"] == trained["ood_auroc_knn_neg"]


# -----------------------------------------------------------------------------
# Refusals: one line, no run folder

@pytest.mark.parametrize("extra,needles", [
    (["--negative-mode", "score"], ["--negative-mode score", "--negative-data PATH"]),
    (["--negative-mode", "classes", "--loss", "triplet", "NEG"],
     ["--negative-mode classes", "--loss supcon"]),
    (["--negative-mode", "score", "--negative-weight", "0", "NEG"],
     ["--negative-weight has no effect with --negative-mode score"]),
    (["--negative-mode", "score", "--negatives-per-batch", "0.5", "NEG"],
     ["--negatives-per-batch has no effect with --negative-mode score"]),
    (["--negative-mode", "classes", "--hard-negatives", "all", "NEG"],
     ["--hard-negatives has no effect with --negative-mode classes"]),
    (["--negative-mode", "classes", "--negative-weight", "0.5", "NEG"],
     ["--negative-weight has no effect with --negative-mode classes"]),
])
def test_refused_in_one_line(extra, needles, folders, tmp_path, capsys):
    imgs, neg = folders
    extra = [a for a in extra if a != "NEG"] + (["--negative-data", neg] if "NEG" in extra else [])
    runs = tmp_path / "runs"
    code, err = command("train", ["--data", imgs, *RUN, *extra, "--out", str(runs)], capsys)
    assert_one_line(code, err, *needles)
    assert not runs.exists() or os.listdir(runs) == []
