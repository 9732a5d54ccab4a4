"""supcon.SupConLoss as a drop-in for the widely copied reference SupConLoss (Khosla et al.'s code):
on the inputs the reference training script passes -- L2-normalised features (bsz, n_views, dim)
-- it gives the reference's values in both contrast modes, with labels, with a custom (asymmetric)
mask and with neither (SimCLR). The reference is written out here as a loop over anchors."""

import math

import pytest
import torch
import torch.nn.functional as F

from supcon import SupConLoss


def reference_loop(features, labels=None, mask=None, contrast_mode="all", temperature=0.07,
                   base_temperature=0.07, negative_only=None, skip_anchors_without_positive=False):
    """The reference formula, anchor by anchor: features as given (no normalisation); rows are
    view-major (row v * bsz + b is view v of image b); anchor i's positives are the rows j != i
    with mask[img(i), img(j)] (labels: equal labels; neither: the same image); its denominator
    sums exp(s_ij) over every row j != i; L_i = -(tau / base) * mean over positives of
    (s_ip - log denominator), 0 for an anchor without a positive; the loss is the mean over the
    anchors (every view with "all", the first view with "one"). negative_only (this project's
    extension): such rows are never anchors or positives, and count in the denominator of
    anchors of their label only."""
    B, V, _ = features.shape
    if labels is None and mask is None:
        mask = torch.eye(B)
    elif labels is not None:
        mask = (labels[:, None] == labels[None, :]).float()
    neg = [False] * B if negative_only is None else [bool(x) for x in negative_only]
    rows = [(features[b, v].double(), b) for v in range(V) for b in range(B)]
    anchors = range(len(rows)) if contrast_mode == "all" else range(B)
    per_anchor = []
    for i in anchors:
        zi, bi = rows[i]
        if neg[bi]:
            continue
        others = [(j, zj, bj) for j, (zj, bj) in enumerate(rows) if j != i and
                  (not neg[bj] or (labels is not None and labels[bj] == labels[bi]))]
        log_den = math.log(sum(math.exp(float(zi @ zj) / temperature) for _, zj, _ in others))
        positives = [float(zi @ zj) / temperature - log_den for _, zj, bj in others
                     if mask[bi, bj] > 0 and not neg[bj]]
        if not positives:
            if not skip_anchors_without_positive:
                per_anchor.append(0.0)  # the reference: 0, counted in the mean
            continue
        per_anchor.append(-(temperature / base_temperature) * sum(positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def batch(bsz=10, views=2, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(bsz, views, dim, generator=g, dtype=torch.float64), dim=2)
    labels = torch.randint(0, 3, (bsz,), generator=g)
    return features, labels


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("temperature,base", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
@pytest.mark.parametrize("views", [2, 3])
def test_labels_give_the_references_value(mode, temperature, base, views):
    features, labels = batch(views=views, seed=views)
    criterion = SupConLoss(temperature=temperature, contrast_mode=mode, base_temperature=base)
    expected = reference_loop(features, labels, None, mode, temperature, base)
    assert criterion(features, labels).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_a_custom_asymmetric_mask_gives_the_references_value(mode):
    features, _ = batch(seed=3)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(10, 10, generator=g) < 0.3).float()
    mask.fill_diagonal_(1)  # an image's other views are its positives, as in the reference's use
    assert not torch.equal(mask, mask.T)  # asymmetric
    expected = reference_loop(features, None, mask, mode)
    assert SupConLoss(contrast_mode=mode)(features, mask=mask).item() == \
        pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_neither_labels_nor_mask_is_simclr_as_in_the_reference(mode):
    features, _ = batch(seed=5)
    expected = reference_loop(features, None, None, mode)
    assert SupConLoss(contrast_mode=mode)(features).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_negative_only_images_are_negatives_of_their_class_only(mode):
    features, labels = batch(bsz=12, seed=6)
    neg = torch.tensor([False, True] * 6)
    expected = reference_loop(features, labels, None, mode, negative_only=neg)
    got = SupConLoss(contrast_mode=mode)(features, labels, negative_only=neg)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_the_gradient_a_training_script_sees_is_the_references():
    # the reference's training script normalises the head's output; the module normalises
    # again (a no-op on unit vectors), so the gradient reaching the head is the same
    g = torch.Generator().manual_seed(7)
    head_out = torch.randn(8, 2, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    grads = []
    for loss_of in (lambda f: SupConLoss(temperature=0.1)(f, labels),
                    lambda f: reference_autograd(f, labels, 0.1)):
        h = head_out.clone().requires_grad_()
        loss_of(F.normalize(h, dim=2)).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def reference_autograd(features, labels, temperature, base_temperature=0.07):
    """The reference's tensor code, written out again (float masks, max-shift, mean over anchors),
    for autograd's gradient."""
    B, V, _ = features.shape
    mask = (labels[:, None] == labels[None, :]).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(V, V)
    not_self = 1 - torch.eye(V * B, dtype=features.dtype)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def test_where_it_differs_from_the_reference_anchors_without_a_positive():
    # a mask row of zeros (not even the image's own other view): the reference counts those
    # anchors as 0 in the mean, this module leaves them out (as supcon_loss does)
    features, _ = batch(seed=8)
    mask = torch.eye(10)
    mask[0, 0] = 0
    got = SupConLoss()(features, mask=mask).item()
    assert got == pytest.approx(reference_loop(features, None, mask, "all",
                                               skip_anchors_without_positive=True), rel=1e-10)
    assert got != pytest.approx(reference_loop(features, None, mask, "all"), rel=1e-6)


def test_refusals_as_in_the_reference():
    features, labels = batch()
    with pytest.raises(ValueError, match="both labels and mask"):
        SupConLoss()(features, labels, mask=torch.eye(10))
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        SupConLoss()(features[:, 0], labels)
    with pytest.raises(ValueError, match="contrast_mode"):
        SupConLoss(contrast_mode="two")
    with pytest.raises(ValueError, match="needs labels"):  # a mask has no classes
        SupConLoss()(features, mask=torch.eye(10), negative_only=torch.tensor([True] + [False] * 9))


@pytest.mark.parametrize("mode", ["all", "one"])
def test_labels_of_shape_bsz_by_1_as_the_reference_takes_them(mode):
    features, labels = batch(seed=9)
    expected = reference_loop(features, labels, None, mode)
    got = SupConLoss(contrast_mode=mode)(features, labels[:, None])
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_a_weighted_mask_is_refused_not_binarised():
    # the reference multiplies a weighted mask into its sums; reading 0.5 as True would be a
    # silent change of meaning, so it is refused in one line
    features, _ = batch(seed=10)
    mask = torch.eye(10)
    mask[0, 1] = 0.5
    with pytest.raises(ValueError, match="0s and 1s"):
        SupConLoss()(features, mask=mask)
    assert torch.isfinite(SupConLoss()(features, mask=mask.bool()))  # bools are fine
