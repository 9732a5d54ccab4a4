"""The linear probe (train.train_linear) and features that do not vary on its training set: a
dead ReLU unit (exactly 0 on every probe image) or a near-dead one must not get an arbitrary,
huge weight, so a test image that wakes it moves the logits no more than a live unit would;
features that all vary are fitted exactly as plain standardisation fits them."""

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train

K, N = 3, 240  # classes, probe images
DEAD, NEAR_DEAD = [5, 6], 7  # of 8 features: 0..4 live


def probe_features(seed=0):
    """(N, 8) ReLU-like features of 3 classes: 5 live columns that tell the classes apart,
    columns 5 and 6 exactly 0 on every image (dead), column 7 nearly constant (std ~1e-5)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    centres = torch.rand(K, 5, generator=g) * 3  # (K, 5)
    live = (centres[labels] + 0.5 * torch.randn(N, 5, generator=g)).relu()  # (N, 5)
    dead = torch.zeros(N, 2)
    near_dead = 0.3 + 1e-5 * torch.randn(N, 1, generator=g)
    return torch.cat([live, dead, near_dead], 1), labels


def logit_spread_change(probe, x, feature, value):
    """How much setting x[feature] to value moves the logits' spread (max - min of the change):
    what moves the softmax (a shift of every logit by the same amount moves nothing)."""
    lit = x.clone()
    lit[feature] = value
    with torch.no_grad():
        change = probe(lit[None])[0] - probe(x[None])[0]  # (K,)
    return (change.max() - change.min()).item()


@pytest.mark.parametrize("outlier_exposure", [0.0, 0.5])
def test_a_woken_dead_unit_moves_the_logits_no_more_than_a_live_one(outlier_exposure):
    features, labels = probe_features()
    args = types.SimpleNamespace(linear_epochs=30, outlier_exposure=outlier_exposure)
    # outliers: live-like features of no class; silent where the probe images are silent
    outliers = probe_features(seed=1)[0].roll(1, dims=1)
    outliers[:, DEAD] = 0.0
    outliers[:, NEAR_DEAD] = 0.3
    probe = train.train_linear(args, features, labels, K, torch.device("cpu"), seed=0,
                               outliers=outliers)
    assert (probe(features).argmax(1) == labels).float().mean() > 0.8  # the live units are used
    value = features[:, :5].max().item()  # the largest activation a live unit reaches
    for x in features[:10]:  # some probe images, each lit on one unit at a time
        live = max(logit_spread_change(probe, x, i, value) for i in range(5))
        for unit in [*DEAD, NEAR_DEAD]:
            assert logit_spread_change(probe, x, unit, value) <= live, (unit, live)
    # a unit that never fired keeps no weight at all: nothing to learn it from
    assert torch.equal(probe.weight[:, DEAD], torch.zeros(K, len(DEAD)))


def test_features_that_all_vary_are_fitted_as_plain_standardisation_fits_them():
    features, labels = probe_features()
    features = features[:, :5]  # the live units only
    args = types.SimpleNamespace(linear_epochs=5, outlier_exposure=0.0)
    probe = train.train_linear(args, features, labels, K, torch.device("cpu"), seed=4)
    # the plain fit, written out: standardise by mean and std, AdamW with a cosine schedule,
    # batches of 256 in the seeded order, then the statistics folded into the layer
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    layer = nn.Linear(5, K)
    mu, sigma = features.mean(0), features.std(0)
    x = (features - mu) / sigma
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    steps = args.linear_epochs * math.ceil(N / 256)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    for _ in range(args.linear_epochs):
        for idx in torch.split(torch.randperm(N, generator=g), 256):
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), labels[idx]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        expected = layer(x)  # the logits on standardised features
    torch.testing.assert_close(probe(features).detach(), expected, rtol=1e-5, atol=1e-5)


def test_separable_features_with_dead_units_classify_as_sklearn_does():
    linear_model = pytest.importorskip("sklearn.linear_model", reason="scikit-learn not installed")
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(2 * N) % K
    live = (3.0 * F.one_hot(labels, 5).float() + 0.5 * torch.randn(2 * N, 5, generator=g)).relu()
    features = torch.cat([live, torch.zeros(2 * N, 2), torch.full((2 * N, 1), 0.3)], 1)
    train_x, train_y, test_x = features[:N], labels[:N], features[N:]  # (N, 8), (N,), (N, 8)
    args = types.SimpleNamespace(linear_epochs=100, outlier_exposure=0.0)
    probe = train.train_linear(args, train_x, train_y, K, torch.device("cpu"), seed=0)
    reference = linear_model.LogisticRegression(max_iter=2000).fit(train_x.numpy(),
                                                                    train_y.numpy())
    assert reference.score(train_x.numpy(), train_y.numpy()) == 1.0  # separable: sklearn says so
    with torch.no_grad():
        assert torch.equal(probe(train_x).argmax(1), train_y)
        ours = probe(test_x).argmax(1)  # (N,) on images the fits never saw
    assert torch.equal(ours, torch.from_numpy(reference.predict(test_x.numpy())))
