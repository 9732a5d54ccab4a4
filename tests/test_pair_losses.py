"""Triplet and cosine-pair losses (supcon.py) against torch built-ins and brute-force miners."""

import pytest
import torch
import torch.nn.functional as F

from supcon import cosine_pair_loss, mine_triplets, triplet_loss


def batch(N=14, D=6, classes=4, neg_fraction=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (N,), generator=g)
    neg = torch.rand(N, generator=g) < neg_fraction
    return x, labels, neg


def candidates(labels, neg, i):
    """Brute force: the positives and negatives an anchor i may use."""
    N = len(labels)
    pos = [j for j in range(N) if j != i and labels[j] == labels[i] and not neg[j]]
    negs = [j for j in range(N) if labels[j] != labels[i] or neg[j]]
    return pos, negs


def dist(x, distance):
    if distance == "euclidean":
        return torch.cdist(x, x)
    x = F.normalize(x, dim=1)
    return 1 - x @ x.T


def brute_anchors(labels, neg):
    return [i for i in range(len(labels)) if not neg[i] and all(map(len, candidates(labels, neg, i)))]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_and_hard_negative_miners(distance):
    x, labels, neg = batch(seed=1)
    d = dist(x, distance)
    a, p, n = mine_triplets(x, labels, neg, mining="batch_hard", distance=distance)
    assert a.tolist() == brute_anchors(labels, neg)
    for i, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        pos, negs = candidates(labels, neg, i)
        assert pi == max(pos, key=lambda j: d[i, j])
        assert ni == min(negs, key=lambda j: d[i, j])
    a, p, n = mine_triplets(x, labels, neg, mining="hard_negative", distance=distance,
                            generator=torch.Generator().manual_seed(0))
    for i, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        pos, negs = candidates(labels, neg, i)
        assert pi in pos and ni == min(negs, key=lambda j: d[i, j])


def test_random_miner_picks_valid_and_covers_all_candidates():
    x, labels, neg = batch(seed=2)
    seen = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        a, p, n = mine_triplets(x, labels, neg, mining="random", generator=g)
        assert a.tolist() == brute_anchors(labels, neg)
        for i, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
            pos, negs = candidates(labels, neg, i)
            assert pi in pos and ni in negs
            seen.setdefault(i, (set(), set()))
            seen[i][0].add(pi)
            seen[i][1].add(ni)
    for i, (ps, ns) in seen.items():  # uniform choice: every candidate turns up in 300 draws
        pos, negs = candidates(labels, neg, i)
        assert ps == set(pos) and ns == set(negs)


def pairs_batch(seed):
    # every label appears exactly twice among the real samples: each anchor's positive is unique,
    # so semi-hard and mixed mining become deterministic and can be checked exactly
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 2])
    neg = torch.tensor([False] * 8 + [True] * 2)
    return torch.randn(10, 3, generator=g, dtype=torch.float64), labels, neg


@pytest.mark.parametrize("seed", range(5))
def test_semi_hard_miner(seed):
    x, labels, neg = pairs_batch(seed)
    margin = 0.8
    d = dist(x, "euclidean")
    a, p, n = mine_triplets(x, labels, neg, mining="semi_hard", margin=margin,
                            generator=torch.Generator().manual_seed(seed))
    expected = []
    for i in range(10):
        if neg[i]:
            continue
        pos, negs = candidates(labels, neg, i)
        semi = [j for j in negs if d[i, pos[0]] < d[i, j] < d[i, pos[0]] + margin]
        if semi:
            expected.append(i)
            k = a.tolist().index(i)
            assert p[k] == pos[0] and n[k].item() in semi
    assert a.tolist() == expected


@pytest.mark.parametrize("seed", range(3))
def test_mixed_miner_takes_negative_closest_to_positive(seed):
    x, labels, neg = pairs_batch(seed)
    d = dist(x, "euclidean")
    a, p, n = mine_triplets(x, labels, neg, mining="mixed")
    assert a.tolist() == list(range(8))
    for i, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        pos, negs = candidates(labels, neg, i)
        assert pi == pos[0] and ni == min(negs, key=lambda j: d[pi, j])


@pytest.mark.parametrize("mining", ["random", "batch_hard", "hard_negative", "semi_hard", "mixed"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_triplet_loss_matches_torch_on_mined_triplets(mining, distance):
    x, labels, neg = batch(N=20, seed=3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = triplet_loss(x1, labels, neg, margin=0.5, mining=mining, distance=distance,
                        generator=torch.Generator().manual_seed(4))
    a, p, n = mine_triplets(x, labels, neg, margin=0.5, mining=mining, distance=distance,
                            generator=torch.Generator().manual_seed(4))
    if distance == "euclidean":
        expected = F.triplet_margin_loss(x2[a], x2[p], x2[n], margin=0.5)
    else:
        expected = F.triplet_margin_with_distance_loss(
            x2[a], x2[p], x2[n], margin=0.5,
            distance_function=lambda u, v: 1 - F.cosine_similarity(u, v))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_triplet_loss_without_triplets_is_zero_with_zero_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    loss = triplet_loss(x, torch.arange(4))  # no positives
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


def test_negative_only_samples_are_never_triplet_anchors_or_positives():
    x, labels, neg = batch(N=30, seed=5, neg_fraction=0.4)
    for mining in ("random", "batch_hard", "semi_hard"):
        a, p, n = mine_triplets(x, labels, neg, mining=mining, margin=5.0,
                                generator=torch.Generator().manual_seed(0))
        assert not neg[a].any() and not neg[p].any()


@pytest.mark.parametrize("margin", [0.0, 0.3, -0.2])
def test_cosine_pair_loss_matches_cosine_embedding_loss(margin):
    x, labels, neg = batch(N=12, seed=6)
    i, j = torch.triu_indices(12, 12, offset=1)
    keep = ~(neg[i] & neg[j])
    i, j = i[keep], j[keep]
    y = torch.where((labels[i] == labels[j]) & ~neg[i] & ~neg[j], 1.0, -1.0).double()
    expected = torch.nn.CosineEmbeddingLoss(margin=margin)(x[i], x[j], y)
    assert cosine_pair_loss(x, labels, neg, margin=margin).item() == pytest.approx(expected.item(), rel=1e-10)
    # balanced: mean of the positive-pair mean and the negative-pair mean
    each = torch.nn.CosineEmbeddingLoss(margin=margin, reduction="none")(x[i], x[j], y)
    balanced = 0.5 * (each[y > 0].mean() + each[y < 0].mean())
    assert cosine_pair_loss(x, labels, neg, margin=margin, balance=True).item() == \
        pytest.approx(balanced.item(), rel=1e-10)
