"""Tests of supcon_loss (supcon.py: extended Eq. 2 of Khosla et al. 2020) against independent
references.

The references here are written straight from the equations (a Python loop over anchors) or are
the widely used reference formulation written out again; none of them calls supcon.py.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from supcon import supcon_loss, supcon_loss_spec


def loss_by(path, *args, **kwargs):
    """The loss through one path: "spec" (supcon_loss_spec, the paper's form), None (supcon_loss's
    plain path) or an int (its chunked path with that chunk size)."""
    if path == "spec":
        return supcon_loss_spec(*args, **kwargs)
    return supcon_loss(*args, chunk_size=path, **kwargs)


# -----------------------------------------------------------------------------
# Independent references


def brute_force_supcon(features, labels=None, negative_only=None, temperature=0.1,
                       base_temperature=None, hard_negatives="same_class", negative_weight=1.0):
    """Extended Eq. 2 as a loop over anchors, from the sets P(i) and A(i) in supcon.py's notes."""
    if features.dim() == 2:
        features = features[:, None, :]
    B, V, _ = features.shape
    rows = []  # (embedding, label, negative_only, image)
    for b in range(B):
        for v in range(V):
            rows.append((F.normalize(features[b, v].double(), dim=0),
                         None if labels is None else int(labels[b]),
                         False if negative_only is None else bool(negative_only[b]), b))
    per_anchor = []
    for i, (zi, li, ni, bi) in enumerate(rows):
        if ni:
            continue  # negative-only samples are never anchors
        same = (lambda r: r[3] == bi) if labels is None else (lambda r: r[1] == li)
        P = [r for j, r in enumerate(rows) if j != i and not r[2] and same(r)]
        if not P:
            continue
        # a negative-only sample of another class is in A(i) when its rule is "every anchor":
        # hard_negatives "all", or False in a per-image tensor
        every = (lambda r: hard_negatives == "all") if isinstance(hard_negatives, str) else \
            (lambda r: not bool(hard_negatives[r[3]]))
        A = [r for j, r in enumerate(rows) if j != i and
             (not r[2] or every(r) or r[1] == li)]
        # log sum_a w_a exp(s_ia), with the largest s_ia taken out so tiny tau cannot overflow
        logits = [float(zi @ r[0]) / temperature for r in A]
        top = max(logits)
        log_denominator = top + math.log(sum((negative_weight if r[2] else 1.0) * math.exp(s - top)
                                             for r, s in zip(A, logits)))
        # log(exp(s_ip) / denominator) = s_ip - log denominator
        L_i = -sum(float(zi @ p[0]) / temperature - log_denominator for p in P) / len(P)
        per_anchor.append(L_i)
    if not per_anchor:
        return 0.0
    loss = sum(per_anchor) / len(per_anchor)
    if base_temperature is not None:
        loss *= temperature / base_temperature
    return loss


def reference_supcon(features, labels=None, temperature=0.07, base_temperature=0.07):
    """The widely used reference formulation (Khosla et al.'s code): float masks, max-shift,
    exp, log of the row sums, mean over views x images. Written out again here."""
    B, V, _ = features.shape
    features = F.normalize(features, dim=2)
    if labels is None:
        mask = torch.eye(B, dtype=features.dtype)
    else:
        mask = (labels[:, None] == labels[None, :]).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # (V*B, D)
    dots = contrast @ contrast.T / temperature
    logits = dots - dots.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(V, V)
    logits_mask = torch.ones_like(mask) - torch.eye(V * B, dtype=mask.dtype)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def random_batch(B=12, V=2, D=5, classes=3, neg_fraction=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, V, D, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (B,), generator=g)
    neg = torch.rand(B, generator=g) < neg_fraction
    return feats, labels, neg


# -----------------------------------------------------------------------------
# Values against the brute-force loop


@pytest.mark.parametrize("views", [1, 2, 4])
@pytest.mark.parametrize("hard_negatives", ["same_class", "all"])
@pytest.mark.parametrize("negative_weight", [1.0, 0.5, 3.0, 0.0])
@pytest.mark.parametrize("chunk_size", ["spec", None, 1, 5])
def test_matches_brute_force_with_negatives(views, hard_negatives, negative_weight, chunk_size):
    feats, labels, neg = random_batch(B=11, V=views, seed=views)
    x = feats if views > 1 else feats[:, 0]
    expected = brute_force_supcon(feats, labels, neg, 0.1, None, hard_negatives, negative_weight)
    got = loss_by(chunk_size, x, labels, neg, temperature=0.1, hard_negatives=hard_negatives,
                  negative_weight=negative_weight)
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("negative_weight", [1.0, 0.5])
@pytest.mark.parametrize("chunk_size", ["spec", None, 1, 4])
def test_two_kinds_of_negatives_each_keep_their_rule(views, negative_weight, chunk_size):
    # synthetic near-OOD images of a class (their class's anchors only) beside real photographs
    # of no class (every anchor) in one batch: a rule per image
    feats, labels, neg = random_batch(B=14, V=views, seed=20 + views, neg_fraction=0.5)
    g = torch.Generator().manual_seed(7)
    own_class = torch.rand(14, generator=g) < 0.5  # True: its class's anchors only
    assert (neg & own_class).any() and (neg & ~own_class).any()  # both kinds present
    x = feats if views > 1 else feats[:, 0]
    expected = brute_force_supcon(feats, labels, neg, 0.1, None, own_class, negative_weight)
    got = loss_by(chunk_size, x, labels, neg, temperature=0.1, hard_negatives=own_class,
                  negative_weight=negative_weight)
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # the two kinds really differ from either single rule
    for rule in ("same_class", "all"):
        assert brute_force_supcon(feats, labels, neg, 0.1, None, rule, negative_weight) != \
            pytest.approx(expected, rel=1e-6)
    # all-True / all-False tensors are the two string rules
    for rule, flags in (("same_class", torch.ones(14, dtype=torch.bool)),
                        ("all", torch.zeros(14, dtype=torch.bool))):
        assert loss_by(chunk_size, x, labels, neg, hard_negatives=flags).item() \
            == pytest.approx(supcon_loss(x, labels, neg, hard_negatives=rule).item(), rel=1e-12)


def test_per_sample_rule_and_base_temperature_are_checked():
    feats, labels, neg = random_batch(B=6, V=2, seed=1)
    with pytest.raises(ValueError, match="hard_negatives"):
        supcon_loss(feats, labels, neg, hard_negatives=torch.ones(6))  # floats, not bool
    with pytest.raises(ValueError, match="expected length 6"):
        supcon_loss(feats, labels, neg, hard_negatives=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs labels"):  # SimCLR has no class for the rule
        supcon_loss(feats, None, torch.ones(6, dtype=torch.bool) & neg | torch.tensor([True] + [False] * 5),
                    hard_negatives=torch.ones(6, dtype=torch.bool))
    for bad in (0.0, -0.07, float("nan")):
        with pytest.raises(ValueError, match="base_temperature"):
            supcon_loss(feats, labels, neg, base_temperature=bad)


@pytest.mark.parametrize("views", [2, 4])
@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("chunk_size", ["spec", None, 3])
def test_simclr_matches_brute_force(views, with_negatives, chunk_size):
    feats, _, neg = random_batch(B=7, V=views, seed=10 + views)
    neg = neg if with_negatives else None
    expected = brute_force_supcon(feats, None, neg, 0.2, None, "all")
    got = loss_by(chunk_size, feats, None, neg, temperature=0.2, hard_negatives="all")
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("temperature,base", [(0.1, None), (0.07, 0.07), (0.5, 0.07), (0.01, None)])
def test_temperatures_match_brute_force(temperature, base):
    feats, labels, neg = random_batch(B=10, V=2, seed=3)
    expected = brute_force_supcon(feats, labels, neg, temperature, base)
    for chunk in ("spec", None, 4):
        got = loss_by(chunk, feats, labels, neg, temperature=temperature, base_temperature=base)
        assert got.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("labelled", [True, False])
def test_equals_reference_formulation_without_negatives(labelled):
    feats, labels, _ = random_batch(B=16, V=2, D=8, classes=4, seed=5)
    labels = labels if labelled else None
    expected = reference_supcon(feats, labels, temperature=0.07, base_temperature=0.07)
    got = supcon_loss(feats, labels, temperature=0.07, base_temperature=0.07)
    # the reference averages over every anchor; with 4 classes x 16 images every anchor has a positive
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    expected_scaled = reference_supcon(feats, labels, temperature=0.1, base_temperature=0.07)
    assert supcon_loss(feats, labels, temperature=0.1, base_temperature=0.07).item() == \
        pytest.approx(expected_scaled.item(), rel=1e-10)


# -----------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("hard_negatives", ["same_class", "all"])
def test_every_fast_path_equals_the_specification_in_value_and_gradient(hard_negatives):
    feats, labels, neg = random_batch(B=40, V=2, D=16, classes=5, seed=7)
    grads, values = [], []
    for chunk in ("spec", None, 1, 7, 64, 1000):  # the specification first: the reference
        x = feats.clone().requires_grad_()
        loss = loss_by(chunk, x, labels, neg, hard_negatives=hard_negatives, negative_weight=0.7)
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad)
    for v, g in zip(values[1:], grads[1:]):
        assert v == pytest.approx(values[0], rel=1e-12)
        torch.testing.assert_close(g, grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", ["spec", None, 3])
@pytest.mark.parametrize("labelled", [True, False])
def test_gradcheck(chunk_size, labelled):
    feats, labels, neg = random_batch(B=6, V=2, D=4, classes=2, seed=11)
    x = feats.clone().requires_grad_()
    kwargs = dict(negative_only=neg, negative_weight=0.5,
                  hard_negatives="same_class" if labelled else "all")
    assert torch.autograd.gradcheck(
        lambda f: loss_by(chunk_size, f, labels if labelled else None, **kwargs), (x,))


def test_gradient_matches_brute_force_autograd():
    # the brute-force loop is differentiable too when written with tensors: compare gradients
    feats, labels, neg = random_batch(B=8, V=2, D=4, seed=12)
    x = feats.clone().requires_grad_()
    supcon_loss(x, labels, neg, chunk_size=3).backward()
    eps = 1e-6
    numeric = torch.zeros_like(feats)
    for idx in itertools.product(*map(range, feats.shape)):
        up, down = feats.clone(), feats.clone()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (brute_force_supcon(up, labels, neg) - brute_force_supcon(down, labels, neg)) / (2 * eps)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-5, atol=1e-7)


# -----------------------------------------------------------------------------
# The thesis's three defects must not come back


def test_negative_only_of_class_zero_is_not_a_positive():
    # thesis defect 2: OOD labels were -class_id, so class 0's near-OOD images became positives
    feats, labels, _ = random_batch(B=10, V=1, seed=13)
    labels[:] = 0
    neg = torch.zeros(10, dtype=torch.bool)
    neg[5:] = True
    got = supcon_loss(feats[:, 0], labels, neg, hard_negatives="same_class")
    as_positives = supcon_loss(feats[:, 0], labels)  # what the defect computed
    assert got.item() == pytest.approx(brute_force_supcon(feats, labels, neg), rel=1e-10)
    assert got.item() != pytest.approx(as_positives.item(), rel=1e-3)


def test_masked_negatives_are_removed_exactly():
    # thesis defect 1: masked entries stayed in the denominator at full weight.
    # A negative-only sample of another class must not change a class-0 anchor's loss at all,
    # however close it is; with weight 0 a negative must vanish exactly.
    feats, _, _ = random_batch(B=6, V=2, seed=14)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    neg = torch.tensor([False, False, False, False, False, True])
    base = supcon_loss(feats[:5], labels[:5])  # without the negative
    for scale in (1.0, 100.0):
        moved = feats.clone()
        moved[5] = feats[0] * scale  # put it right on top of a class-0 anchor
        with_neg = supcon_loss(moved, labels, neg, hard_negatives="same_class")
        # class-0 anchors ignore it; class-1 anchors see it: so compare class-0-only batches
        only0 = supcon_loss(moved[[0, 1, 2, 5]], torch.tensor([0, 0, 0, 1]),
                            torch.tensor([False, False, False, True]))
        assert only0.item() == pytest.approx(supcon_loss(feats[:3], labels[:3]).item(), rel=1e-12)
        assert with_neg.item() != pytest.approx(base.item(), rel=1e-6)
    zero_weight = supcon_loss(feats, labels, neg, negative_weight=0.0)
    assert zero_weight.item() == pytest.approx(base.item(), rel=1e-12)


def test_negative_only_samples_are_never_anchors():
    # thesis defect 3: near-OOD samples stayed anchors. Two negative-only samples that are each
    # other's "positives" (same class, same image) must add no anchor term.
    feats, labels, _ = random_batch(B=6, V=2, seed=15)
    neg = torch.tensor([False] * 4 + [True] * 2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # class 2 exists only as negatives
    got = supcon_loss(feats, labels, neg)
    # with "same_class", class-2 negatives meet no anchor: the loss equals the loss without them
    assert got.item() == pytest.approx(supcon_loss(feats[:4], labels[:4]).item(), rel=1e-12)
    got_all = supcon_loss(feats, labels, neg, hard_negatives="all")
    assert got_all.item() == pytest.approx(brute_force_supcon(feats, labels, neg, hard_negatives="all"), rel=1e-10)


# -----------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("chunk_size", ["spec", None, 2])
def test_no_positives_gives_zero_and_zero_gradients(chunk_size):
    x = torch.randn(5, 8, requires_grad=True)
    loss = loss_by(chunk_size, x, torch.arange(5))  # all labels different
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    # all negative-only: no anchors at all
    y = torch.randn(4, 2, 8, requires_grad=True)
    loss = loss_by(chunk_size, y, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(y.grad).all() and not y.grad.any()
    # half-precision input: the zero comes back in fp32, like every other value of the loss
    h = torch.randn(5, 8, dtype=torch.float16)
    assert loss_by(chunk_size, h, torch.arange(5)).dtype == torch.float32


def test_one_sample():
    x = torch.randn(1, 8, requires_grad=True)
    loss = supcon_loss(x, torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    # one image with two views is a valid SimCLR batch with one positive and no negatives: L = 0
    y = torch.randn(1, 2, 8, dtype=torch.float64)
    assert supcon_loss(y).item() == pytest.approx(brute_force_supcon(y), abs=1e-12)


def test_all_labels_equal():
    feats, _, _ = random_batch(B=6, V=2, seed=16)
    labels = torch.zeros(6, dtype=torch.long)
    assert supcon_loss(feats, labels).item() == pytest.approx(brute_force_supcon(feats, labels), rel=1e-10)


def test_identical_features():
    x = torch.ones(6, 2, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = supcon_loss(x, labels)
    loss.backward()
    # every similarity is 1, so each L_i = log(|A(i)|) = log(11)
    assert loss.item() == pytest.approx(math.log(11), rel=1e-12)
    assert torch.isfinite(x.grad).all()


def test_unnormalised_input_is_normalised_inside():
    feats, labels, neg = random_batch(B=8, V=2, seed=17)
    scales = torch.rand(8, 2, 1, dtype=torch.float64) * 100 + 0.01
    a = supcon_loss(feats, labels, neg)
    b = supcon_loss(feats * scales, labels, neg)
    c = supcon_loss(F.normalize(feats, dim=2), labels, neg)
    assert a.item() == pytest.approx(b.item(), rel=1e-10) and a.item() == pytest.approx(c.item(), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_small_temperature_does_not_overflow(chunk_size):
    feats, labels, neg = random_batch(B=10, V=2, seed=18, dtype=torch.float32)
    x = feats.clone().requires_grad_()
    loss = supcon_loss(x, labels, neg, temperature=0.01, chunk_size=chunk_size)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() == pytest.approx(brute_force_supcon(feats.double(), labels, neg, 0.01), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", ["spec", None, 4])
def test_half_precision_input(dtype, chunk_size):
    feats, labels, neg = random_batch(B=16, V=2, D=32, seed=19, dtype=torch.float32)
    x = feats.to(dtype).requires_grad_()
    loss = loss_by(chunk_size, x, labels, neg, temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    expected = brute_force_supcon(x.detach().double(), labels, neg, 0.01)
    assert loss.item() == pytest.approx(expected, rel=1e-3)


def test_permutation_invariance():
    feats, labels, neg = random_batch(B=12, V=3, seed=20)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    a = supcon_loss(feats, labels, neg)
    b = supcon_loss(feats[perm], labels[perm], neg[perm])
    view_perm = supcon_loss(feats[:, [2, 0, 1]], labels, neg)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert a.item() == pytest.approx(view_perm.item(), rel=1e-12)


def test_invalid_inputs_raise_clear_errors():
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="shape"):
        supcon_loss(torch.randn(8), torch.zeros(8))
    with pytest.raises(ValueError, match="shape"):
        supcon_loss(torch.randn(2, 2, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="labels must have one entry per image.*expected length 4"):
        supcon_loss(x, torch.zeros(8))
    with pytest.raises(ValueError, match="negative_only must have one entry per row"):
        supcon_loss(x[:, 0], torch.zeros(4), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        supcon_loss(x, torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="V >= 2"):
        supcon_loss(x[:, 0])
    with pytest.raises(ValueError, match="hard_negatives"):
        supcon_loss(x, torch.zeros(4), hard_negatives="some")
    with pytest.raises(ValueError, match="needs labels"):
        supcon_loss(x, None, torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(x, torch.zeros(4), temperature=0)
    with pytest.raises(ValueError, match="negative_weight"):
        supcon_loss(x, torch.zeros(4), negative_weight=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        supcon_loss(x, torch.zeros(4), chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.5, 0.03, 0.02, 0.005, 0.002])
@pytest.mark.parametrize("hard_negatives", ["same_class", "all"])
def test_chunked_on_both_sides_of_the_fixed_shift(dtype, temperature, hard_negatives):
    """The chunked path shifts by the constant 1/tau while exp(-2/tau) is a normal float (fp32:
    tau >= 2/77, fp64: tau >= 2/698) and by each row's maximum below that; both sides must give
    extended Eq. 2's value and the plain path's gradient (autograd through logsumexp)."""
    feats, labels, neg = random_batch(B=14, V=2, D=6, seed=23, dtype=dtype)
    feats[0, 1] = -feats[0, 0]  # an anchor whose positive is as far away as it can be (cos = -1)
    expected = brute_force_supcon(feats.double(), labels, neg, temperature, None, hard_negatives, 0.5)
    grads = []
    for chunk_size in (None, 5):
        x = feats.clone().requires_grad_()
        loss = supcon_loss(x, labels, neg, temperature=temperature, hard_negatives=hard_negatives,
                           negative_weight=0.5, chunk_size=chunk_size)
        loss.backward()
        assert torch.isfinite(x.grad).all()
        assert loss.item() == pytest.approx(expected, rel=1e-9 if dtype == torch.float64 else 1e-4)
        grads.append(x.grad)
    scale = grads[0].abs().max()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(grads[1], grads[0], rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("chunk_size", ["spec", None, 4])
def test_autocast_keeps_the_loss_in_fp32(chunk_size):
    """Under torch.autocast (how train.py runs the encoder) the loss's products must stay fp32,
    forward and backward, or the chunked gradient would not match its own forward."""
    feats, labels, neg = random_batch(B=16, V=2, D=32, seed=29, dtype=torch.float32)
    x = feats.clone().requires_grad_()
    expected = loss_by(chunk_size, x, labels, neg)
    expected.backward()
    expected_grad, x.grad = x.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_by(chunk_size, x, labels, neg)
        if isinstance(chunk_size, int):
            loss.backward()  # the chunked gradient is ours: fp32 even if backward runs in autocast
    if not isinstance(chunk_size, int):
        loss.backward()  # autograd's own backward: outside autocast, as PyTorch's docs ask
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_labels_as_list_numpy_or_tensor_give_the_brute_force_loss(chunk_size):
    # labels and negative_only may come as lists, numpy arrays or tensors (the row bookkeeping
    # runs on the labels' device, the math on the features'); every form gives the same value
    import numpy as np
    torch.manual_seed(3)
    features = torch.randn(8, 2, 5, dtype=torch.float64)
    labels = [0, 1, 0, 2, 1, 2, 0, 1]
    negative_only = [False, False, False, False, False, True, True, False]
    expected = brute_force_supcon(features, labels, negative_only, temperature=0.2, negative_weight=0.5)
    for as_type in (list, np.array, torch.tensor):
        loss = supcon_loss(features, as_type(labels), as_type(negative_only), temperature=0.2,
                           negative_weight=0.5, chunk_size=chunk_size)
        assert loss.item() == pytest.approx(expected, rel=1e-10), as_type


@pytest.mark.parametrize("loss_name", ["supcon plain", "supcon chunked", "triplet"])
def test_gradients_are_the_same_on_every_call_with_several_threads(loss_name):
    # seeded runs must repeat exactly: no gradient may depend on how CPU threads split the work
    # (the backward of indexing with repeated indices adds in a thread-dependent order)
    from supcon import triplet_loss
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        z = torch.randn(512, 2, 128, requires_grad=True)
        labels = torch.randint(0, 8, (512,))

        def gradient():
            z.grad = None
            if loss_name == "triplet":
                loss = triplet_loss(z.flatten(0, 1), labels.repeat_interleave(2), mining="random",
                                    generator=torch.Generator().manual_seed(0))
            else:
                loss = supcon_loss(z, labels, chunk_size=256 if "chunked" in loss_name else None)
            loss.backward()
            return z.grad.clone()

        first = gradient()
        for _ in range(3):
            assert torch.equal(gradient(), first)
    finally:
        torch.set_num_threads(threads)
