"""evaluate.py metrics against scikit-learn, hand-computed examples and brute-force loops."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import evaluate


def test_ood_metrics_hand_example():
    # ID scores 1..20, OOD scores: the 5% threshold keeps ID >= 2 (19 of 20 = 95%)
    s_in = np.arange(1, 21, dtype=float)
    s_out = np.array([0.5, 1.5, 2.0, 3.0, 30.0])
    m = evaluate.ood_metrics(s_in, s_out)
    assert m["fpr95"] == pytest.approx(3 / 5)  # 2.0, 3.0 and 30.0 are >= 2
    y = np.r_[np.ones(20), np.zeros(5)]
    s = np.r_[s_in, s_out]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s))
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s))
    # perfect separation
    perfect = evaluate.ood_metrics([5, 6, 7], [1, 2])
    assert perfect["auroc"] == 1.0 and perfect["fpr95"] == 0.0


def test_fpr95_brute_force():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    # brute force: the largest threshold t with TPR(t) = mean(s_in >= t) >= 0.95
    t = max(v for v in s_in if np.mean(s_in >= v) >= 0.95)
    assert evaluate.ood_metrics(s_in, s_out)["fpr95"] == pytest.approx(np.mean(s_out >= t))


def test_knn_score_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 4, generator=g), torch.randn(7, 4, generator=g)
    k = 5
    got = evaluate.knn_score(train, test, k=k, batch_size=3)
    for i in range(7):
        t = test[i] / test[i].norm()
        d = sorted(((t - x / x.norm()).norm().item() for x in train))
        assert got[i].item() == pytest.approx(-d[k - 1], abs=1e-5)


def test_mahalanobis_brute_force():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(60, 3))
    labels = np.repeat([0, 1, 2], 20)
    train[labels == 1] += 2
    test = rng.normal(size=(5, 3))
    got = evaluate.mahalanobis_score(torch.tensor(train), torch.tensor(labels), torch.tensor(test))
    z = train / np.linalg.norm(train, axis=1, keepdims=True)
    t = test / np.linalg.norm(test, axis=1, keepdims=True)
    means = [z[labels == c].mean(0) for c in range(3)]
    centred = np.concatenate([z[labels == c] - means[c] for c in range(3)])
    precision = np.linalg.pinv(centred.T @ centred / 60)
    expected = [max(-(x - m) @ precision @ (x - m) for m in means) for x in t]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_msp_and_knn_classifier():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(evaluate.msp_score(logits).numpy(), [np.exp(2) / (np.exp(2) + 1), 0.5], rtol=1e-6)
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    probs = evaluate.knn_probabilities(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05]]), 2, k=2)
    assert probs.tolist() == [[1.0, 0.0]]


def test_classification_metrics_against_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 100)
    p = rng.dirichlet(np.ones(4), 100)
    p[np.arange(100), y] += 0.3
    m = evaluate.classification_metrics(y, p)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["recall"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr"))
    assert np.trace(m["confusion"]) == (pred == y).sum() and np.sum(m["confusion"]) == 100


def test_few_shot_episodes_are_disjoint_and_balanced():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3] * 1)  # class 3 too small for 1-shot
    episodes = evaluate.few_shot_episodes(labels, n_shot=2, episodes=120, n_query=5, seed=0)
    assert len(episodes) == 120
    for support, s_lab, query, q_lab in episodes:
        assert set(support.tolist()).isdisjoint(query.tolist())
        assert torch.bincount(s_lab).tolist() == [2, 2, 2]  # classes 0, 1, 2: 3-way
        assert torch.bincount(q_lab).tolist() == [5, 5, 1]
        ways = sorted(set(labels.tolist()) - {3})
        assert all(labels[i].item() == ways[w] for i, w in zip(support.tolist(), s_lab.tolist()))
        assert all(labels[i].item() == ways[w] for i, w in zip(query.tolist(), q_lab.tolist()))


def test_few_shot_accuracy_brute_force():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 8 + [1] * 8)
    features = torch.randn(16, 5, generator=g) + labels[:, None] * 0.8
    result = evaluate.few_shot_accuracy(features, labels, n_shot=3, episodes=100, seed=4)
    episodes = evaluate.few_shot_episodes(labels, 3, 100, seed=4)
    z = features / features.norm(dim=1, keepdim=True)
    proto, nn_ = [], []
    for support, s_lab, query, q_lab in episodes:
        correct_p = correct_n = 0
        for q, y in zip(query.tolist(), q_lab.tolist()):
            means = [z[support[s_lab == w]].mean(0) for w in (0, 1)]
            sims = [float(z[q] @ (m / m.norm())) for m in means]
            correct_p += int(np.argmax(sims) == y)
            best = max(range(len(support)), key=lambda i: float(z[q] @ z[support[i]]))
            correct_n += int(s_lab[best].item() == y)
        proto.append(correct_p / len(query))
        nn_.append(correct_n / len(query))
    assert result["prototype"]["mean"] == pytest.approx(np.mean(proto))
    assert result["nearest_neighbour"]["mean"] == pytest.approx(np.mean(nn_))
    assert result["prototype"]["ci95"] == pytest.approx(1.96 * np.std(proto, ddof=1) / np.sqrt(100))
    # perfectly separated classes: every episode right
    far = torch.cat([torch.eye(2)[labels]], 1)
    assert evaluate.few_shot_accuracy(far, labels, 1, 100)["prototype"]["mean"] == 1.0


def test_evaluate_cli_writes_metrics_report_and_pictures(tmp_path):
    import train
    from PIL import Image
    train.main(["--examples-per-class", "10", "--epochs", "1", "--batch-size", "40", "--linear-epochs", "2",
                "--device", "cpu", "--out", str(tmp_path), "--name", "r", "--no-report"])
    run = tmp_path / "r"
    assert not (run / "report.md").exists()
    ood = tmp_path / "ood"
    ood.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8)).save(ood / f"{i}.png")
    evaluate.main([str(run), "--ood-data", str(ood), "--episodes", "100"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["ood"]) == {"held-out classes 8,9", "external"}
    for scores in metrics["ood"].values():
        assert set(scores) == {"MSP", "k-NN", "k-NN (k=1)", "Mahalanobis"}
        assert all(0 <= v["auroc"] <= 1 and 0 <= v["fpr95"] <= 1 for v in scores.values())
    assert metrics["few_shot"]["1-shot"]["episodes"] == 100 and metrics["train_minutes"] > 0
    report = (run / "report.md").read_text()
    for picture in ("tsne.png", "ood_curves.png", "classification_curves.png", "confusion.png", "grad_cam.png"):
        assert (run / picture).stat().st_size > 1000 and f"({picture})" in report
    assert "positive class" in report


def test_an_older_run_folder_reads_with_the_options_added_since(tmp_path):
    # a config.json written before --negative-data, --near-ood-strength and
    # --drop-leaking-synthetic existed (the settings every train.py wrote, data.RUN_SETTINGS):
    # evaluate reads it with those options' defaults (as --resume does); what was saved wins
    import data
    import train
    full = vars(train.with_defaults(train.build_parser().parse_args(["--seed", "3"])))
    older = {k: v for k, v in full.items() if k in data.RUN_SETTINGS}
    (tmp_path / "config.json").write_text(json.dumps({**older, "val_fraction": 0.5}))
    args = evaluate.run_settings(str(tmp_path))
    assert (args.data, args.seed, args.val_fraction) == ("digits", 3, 0.5)
    assert args.negative_data is None and args.near_ood_strength is None
    assert args.drop_leaking_synthetic is False
    assert evaluate.run_settings(str(tmp_path), {"seed": 4}).seed == 4  # overrides win
