"""k-NN on small reference sets: a k the set cannot give is lowered and said (the vote and the
top-5 hit to N - 1, the OOD score to N), never silently; and the top-5 hit accuracy. Checked
against brute-force loops written here from the definitions (cosine similarity to every
reference, sorted, counted)."""

import json

import numpy as np
import pytest
import torch

import data
import evaluate
import supcon


def brute_force_neighbours(train_f, test_f, k):
    """For each query, the indices of its k most cosine-similar references (float64 loops)."""
    train, test = train_f.double().numpy(), test_f.double().numpy()
    out = []
    for q in test:
        sims = [float(q @ r / (np.linalg.norm(q) * np.linalg.norm(r))) for r in train]
        out.append(sorted(range(len(train)), key=lambda i: -sims[i])[:k])
    return out


def brute_force_votes(train_f, train_labels, test_f, k, num_classes):
    """Per query: the votes of its k nearest references, and the predicted class (the most
    votes; a tie to the lowest class id)."""
    votes, preds = [], []
    for nearest in brute_force_neighbours(train_f, test_f, k):
        v = [0] * num_classes
        for i in nearest:
            v[int(train_labels[i])] += 1
        votes.append(v)
        preds.append(v.index(max(v)))  # index(): the first, lowest class id, of the tied
    return votes, preds


def brute_force_top_hit(train_f, train_labels, test_f, test_labels, k):
    """The share of queries whose class is that of one of their k nearest references."""
    hits = [any(int(train_labels[i]) == int(y) for i in nearest) for nearest, y in
            zip(brute_force_neighbours(train_f, test_f, k), test_labels)]
    return sum(hits) / len(hits)


def two_clusters(n_per_class, n_query_per_class, seed=0):
    """20 references of 2 classes (10 each) and balanced queries, two noisy directions."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    train_labels = torch.arange(2).repeat_interleave(n_per_class)
    test_labels = torch.arange(2).repeat_interleave(n_query_per_class)
    train_f = centre[train_labels] + torch.randn(len(train_labels), 4, generator=g)
    test_f = centre[test_labels] + torch.randn(len(test_labels), 4, generator=g)
    return train_f, train_labels, test_f, test_labels


def test_knn_classifier_on_20_references_lowers_k_and_is_not_the_constant():
    train_f, train_labels, test_f, test_labels = two_clusters(10, 15)
    # k = 20 = N: every query counts all 20 references, 10 votes each: the same (tied) vote
    votes_20, preds_20 = brute_force_votes(train_f, train_labels, test_f, 20, 2)
    assert all(v == [10, 10] for v in votes_20) and set(preds_20) == {0}
    constant = float(np.mean(np.array(preds_20) == test_labels.numpy()))
    assert constant == 0.5  # the number the issue saw
    # asked for k = 20, the classifier votes among 19: the brute force with k = 19
    probs = evaluate.knn_probabilities(train_f, train_labels, test_f, 2, k=20)
    votes_19, preds_19 = brute_force_votes(train_f, train_labels, test_f, 19, 2)
    np.testing.assert_allclose(probs.numpy(), np.array(votes_19) / 19, atol=1e-6)
    accuracy = evaluate.classification_metrics(test_labels, probs)["accuracy"]
    assert accuracy == pytest.approx(np.mean(np.array(preds_19) == test_labels.numpy()))
    assert accuracy != constant and accuracy > 0.8  # two separated clusters: mostly right


def test_top5_hit_accuracy_against_brute_force():
    g = torch.Generator().manual_seed(1)
    train_labels, test_labels = torch.arange(4).repeat(10), torch.arange(4).repeat(9)
    centre = torch.randn(4, 6, generator=g)  # 4 classes that overlap: hits and misses both
    train_f = centre[train_labels] + 1.5 * torch.randn(40, 6, generator=g)
    test_f = centre[test_labels] + 1.5 * torch.randn(36, 6, generator=g)
    got = evaluate.knn_top_hit(train_f, train_labels, test_f, test_labels)
    expected = brute_force_top_hit(train_f, train_labels, test_f, test_labels, 5)
    assert got == pytest.approx(expected) and 0 < expected < 1
    # the top-1 hit is the 1-NN accuracy: a second, independent anchor
    _, preds = brute_force_votes(train_f, train_labels, test_f, 1, 4)
    assert evaluate.knn_top_hit(train_f, train_labels, test_f, test_labels, k=1) == \
        pytest.approx(np.mean(np.array(preds) == test_labels.numpy()))


def test_top5_hit_with_fewer_than_5_references_lowers_k_and_says_so():
    train_f, train_labels, test_f, test_labels = two_clusters(2, 6, seed=2)  # 4 references
    # k = 4 = N: every query has both classes among its neighbours, a hit for all
    assert brute_force_top_hit(train_f, train_labels, test_f, test_labels, 4) == 1.0
    got = evaluate.knn_top_hit(train_f, train_labels, test_f, test_labels, k=5)
    assert got == pytest.approx(brute_force_top_hit(train_f, train_labels, test_f, test_labels, 3))
    used, note = evaluate.knn_settings(4)
    assert used["top5_hit"] == 3 and used["classifier"] == 3
    assert "4 images" in note and "top5_hit k 5 -> 3" in note


def test_the_ood_score_keeps_k_n_and_the_record_says_every_k():
    train_f, _, test_f, _ = two_clusters(10, 3, seed=3)
    got = evaluate.knn_score(train_f, test_f, k=50)  # Sun et al.: 50th neighbour of 20: the 20th
    for i, t in enumerate(test_f.double()):
        t = t / t.norm()
        d = sorted(((t - x / x.norm()).norm().item() for x in train_f.double()))
        assert got[i].item() == pytest.approx(-d[19], abs=1e-5)  # the farthest reference
    used, note = evaluate.knn_settings(20)
    assert used == {"classifier": 19, "top5_hit": 5, "ood": {"k-NN": 20, "k-NN (k=1)": 1}}
    assert note.startswith("k-NN: the reference set has 20 images; classifier k 20 -> 19")
    assert "k-NN k 50 -> 20" in note and "same vote" in note
    big, none = evaluate.knn_settings(1000)  # a set large enough: every k as asked, nothing said
    assert big == {"classifier": 20, "top5_hit": 5, "ood": {"k-NN": 50, "k-NN (k=1)": 1}}
    assert none is None


def test_a_reference_set_too_small_for_a_vote_is_refused():
    one = torch.ones(1, 4)
    with pytest.raises(data.DataError, match="has 1 image.*classifier needs at least 2"):
        evaluate.knn_probabilities(one, torch.tensor([0]), torch.ones(3, 4), 2)
    with pytest.raises(data.DataError, match="has 1 image"):
        evaluate.knn_top_hit(one, torch.tensor([0]), torch.ones(3, 4), torch.zeros(3).long())
    with pytest.raises(data.DataError, match="has 0 image.*ood needs at least 1"):
        evaluate.knn_score(torch.zeros(0, 4), torch.ones(3, 4))
    assert evaluate.knn_score(one, torch.ones(2, 4), k=50).tolist() == pytest.approx([0, 0])


def test_a_run_on_20_references_records_and_reports_the_k_and_the_top5_hit(tmp_path, capsys,
                                                                            monkeypatch):
    import train
    # the t-SNE of 400 held-out images is 90% of this test's time and no part of what it checks:
    # its file name only (the report's other pictures are drawn)
    monkeypatch.setattr(evaluate, "plot_tsne", lambda groups, classes, path, seed=0: "tsne.png")
    small = ["--examples-per-class", "10", "--ood-classes", "2,3,4,5,6,7,8,9", "--epochs", "1",
             "--batch-size", "20", "--linear-epochs", "2", "--device", "cpu"]
    train.main(small + ["--out", str(tmp_path), "--name", "r", "--no-report"])
    said = capsys.readouterr().out
    assert said.count("k-NN: the reference set has 20 images; classifier k 20 -> 19") == 1
    assert "k-NN top-5 hit" in said  # train.finish's line
    run = tmp_path / "r"
    evaluate.main([str(run), "--episodes", "5"])  # evaluate(): metrics.json and report.md
    said = capsys.readouterr().out
    assert "classifier k 20 -> 19" in said and "k-NN k 50 -> 20" in said
    assert "k-NN top-5 hit" in said  # the CLI's summary line
    m = json.loads((run / "metrics.json").read_text())
    assert m["knn_k"] == {"classifier": 19, "top5_hit": 5, "ood": {"k-NN": 20, "k-NN (k=1)": 1}}
    assert m["knn_top5_hit"] == m["classification"]["knn"]["top5_hit"]
    assert "20 -> 19" in m["knn_k_lowered"]
    # the same numbers from the run's encoder by brute force
    splits = data.load_data("digits", examples_per_class=10, ood_classes="2,3,4,5,6,7,8,9")
    state = torch.load(run / "model.pt", weights_only=True)
    model, _ = supcon.build_model("cnn", "supcon", 1, 16, 2)
    model.load_state_dict(state["model"])
    f = lambda s: evaluate.extract_features(model, s.images, state["mean"], state["std"],  # noqa
                                            torch.device("cpu"))
    train_f, test_f = f(splits.train), f(splits.test)
    assert len(train_f) == 20
    _, preds = brute_force_votes(train_f, splits.train.labels, test_f, 19, 2)
    y = splits.test.labels.numpy()
    assert m["knn_accuracy"] == pytest.approx(np.mean(np.array(preds) == y))
    assert m["knn_accuracy"] != pytest.approx(np.mean(y == 0))  # not k = 20's constant
    assert m["knn_top5_hit"] == pytest.approx(
        brute_force_top_hit(train_f, splits.train.labels, test_f, splits.test.labels, 5))
    report = (run / "report.md").read_text()
    assert "| top-5 hit |" in report and f"| {m['knn_top5_hit']:.4f} |" in report
    assert "votes among the k = 19 nearest" in report and "k-NN k = 20" in report
    assert "Lowered: k-NN: the reference set has 20 images" in report


def test_the_nearness_table_states_the_k_its_score_had():
    result = {"reference": "r", "test_accuracy": 0.9, "id_test_images": 10, "rows": []}
    assert "k-NN score (k = 50) on" in evaluate.nearness_table(result)  # an older nearness.json
    result["knn_k"] = 48  # a 48-image reference set: Sun et al.'s k = 50 lowered to N
    assert "(k = 48, all 48 of them: 50 asked)" in evaluate.nearness_table(result)
