"""supcon_loss(fused=True), the FlexAttention path, on the CPU: its forward against the brute-force
loop over anchors (tests/test_supcon.py), and the one-line error of its backward, which exists only
on a CUDA GPU. The GPU side (compiled kernels, gradients, speed) is checked by
benchmarks/bench_loss.py on a GPU machine, not here.

Tolerances: fp64 runs FlexAttention's uncompiled CPU forward in fp64, so it meets the loop to 1e-10
like the other paths. fp32 sums M x N terms of size up to exp(1/tau) in fp32 (eps 1.2e-7): relative
1e-5 leaves a factor of about 10 over the errors seen (about 1e-7 relative at tau = 0.1).
"""

import pytest
import torch

from supcon import supcon_loss
from test_supcon import brute_force_supcon, random_batch

FP32_REL = 1e-5
REL = {torch.float64: 1e-10, torch.float32: FP32_REL}


# fp32 at one number of views only: each new dtype or shape can cost FlexAttention's CPU path a
# trace of about half a second (it runs through torch.compile with the eager backend)
@pytest.mark.parametrize("dtype,views", [(torch.float64, 1), (torch.float64, 2),
                                         (torch.float64, 4), (torch.float32, 2)])
@pytest.mark.parametrize("hard_negatives", ["same_class", "all"])
def test_fused_forward_matches_brute_force(dtype, views, hard_negatives):
    feats, labels, neg = random_batch(B=11, V=views, seed=views)
    x = (feats if views > 1 else feats[:, 0]).to(dtype)
    for negative_weight in (1.0, 0.0, 0.25, 4.0):  # 0: negative-only samples vanish exactly
        expected = brute_force_supcon(feats, labels, neg, 0.1, None, hard_negatives,
                                      negative_weight)
        got = supcon_loss(x, labels, neg, temperature=0.1, hard_negatives=hard_negatives,
                          negative_weight=negative_weight, fused=True)
        assert got.dtype == dtype
        assert got.item() == pytest.approx(expected, rel=REL[dtype]), negative_weight


def test_fused_keeps_each_negatives_own_rule():
    # two kinds of negatives in one batch: their class's anchors only (True), every anchor (False)
    feats, labels, neg = random_batch(B=14, V=2, seed=22, neg_fraction=0.5)
    own_class = torch.rand(14, generator=torch.Generator().manual_seed(7)) < 0.5
    assert (neg & own_class).any() and (neg & ~own_class).any()
    expected = brute_force_supcon(feats, labels, neg, 0.1, None, own_class, 0.5)
    got = supcon_loss(feats, labels, neg, hard_negatives=own_class, negative_weight=0.5, fused=True)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("views", [2, 4])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_fused_simclr_matches_brute_force(views, with_negatives):
    feats, _, neg = random_batch(B=7, V=views, seed=10 + views)
    neg = neg if with_negatives else None
    expected = brute_force_supcon(feats, None, neg, 0.2, None, "all")
    got = supcon_loss(feats, None, neg, temperature=0.2, hard_negatives="all", fused=True)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("temperature,base", [(0.07, 0.07), (0.5, None), (0.01, None)])
def test_fused_temperatures(temperature, base):
    # tau = 0.01: |s| up to 100, exp() would overflow fp32 without the log-sum-exp's max-shift
    feats, labels, neg = random_batch(B=10, V=2, seed=3)
    expected = brute_force_supcon(feats, labels, neg, temperature, base)
    for dtype in (torch.float64, torch.float32):
        got = supcon_loss(feats.to(dtype), labels, neg, temperature=temperature,
                          base_temperature=base, fused=True)
        assert got.item() == pytest.approx(expected, rel=REL[dtype] * 10), dtype


def test_fused_negatives_only_of_other_classes():
    # real samples of classes 0 and 1; negative-only samples of class 2 only. With "same_class"
    # no anchor meets them, so the loss is the loss without them; with "all" every anchor does.
    feats, _, _ = random_batch(B=8, V=2, seed=15)
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 2, 2])
    neg = torch.tensor([False] * 6 + [True] * 2)
    without = supcon_loss(feats[:6], labels[:6])
    same_class = supcon_loss(feats, labels, neg, fused=True)
    assert same_class.item() == pytest.approx(without.item(), rel=1e-12)
    for w in (1.0, 0.25):
        expected = brute_force_supcon(feats, labels, neg, hard_negatives="all", negative_weight=w)
        got = supcon_loss(feats, labels, neg, hard_negatives="all", negative_weight=w, fused=True)
        assert got.item() == pytest.approx(expected, rel=1e-10)
    # weight 0 removes every negative-only sample, whatever the masking
    zero = supcon_loss(feats, labels, neg, hard_negatives="all", negative_weight=0.0, fused=True)
    assert zero.item() == pytest.approx(without.item(), rel=1e-12)


def test_fused_batches_without_positives():
    x = torch.randn(5, 8, requires_grad=True)
    loss = supcon_loss(x, torch.arange(5), fused=True)  # every label different: no anchor counts
    loss.backward()  # no FlexAttention call at all, so backward works on the CPU too
    assert loss.item() == 0.0 and not x.grad.any()
    y = torch.randn(4, 2, 8)  # every image negative-only: no anchors
    loss = supcon_loss(y, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                       fused=True)
    assert loss.item() == 0.0
    # one anchor without a positive beside ones with: it is left out of the mean
    feats, labels, neg = random_batch(B=9, V=1, seed=4)
    labels[0] = 99
    expected = brute_force_supcon(feats, labels, neg)
    assert supcon_loss(feats[:, 0], labels, neg, fused=True).item() == \
        pytest.approx(expected, rel=1e-10)


def test_fused_backward_on_the_cpu_says_what_to_do_in_one_line():
    feats, labels, neg = random_batch(B=6, V=2, seed=5)
    x = feats.clone().requires_grad_()
    loss = supcon_loss(x, labels, neg, negative_weight=0.5, fused=True)  # the forward works
    assert loss.item() == pytest.approx(brute_force_supcon(feats, labels, neg, negative_weight=0.5),
                                        rel=1e-10)
    with pytest.raises(RuntimeError) as error:
        loss.backward()
    message = str(error.value)
    assert message == ("supcon_loss(fused=True): the fused path's gradient needs a CUDA GPU "
                       "(FlexAttention has no backward on the CPU); use chunk_size=... instead")
    assert "\n" not in message
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*use chunk_size"):
        torch.autograd.grad(supcon_loss(x, labels, neg, fused=True), x)
    # without a gradient to compute (no_grad, or inputs that need none) nothing raises
    with torch.no_grad():
        assert torch.isfinite(supcon_loss(x, labels, neg, fused=True))


def test_fused_settings_and_autocast():
    feats, labels, neg = random_batch(B=8, V=2, seed=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="fused"):
        supcon_loss(feats, labels, neg, fused=True, chunk_size=4)
    with pytest.raises(ValueError, match="fused"):
        supcon_loss(feats, labels, neg, fused="yes")
    # under autocast and from bf16 input the loss still runs in fp32
    expected = supcon_loss(feats, labels, neg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = supcon_loss(feats, labels, neg, fused=True)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=FP32_REL)
    half = feats.to(torch.bfloat16)
    got = supcon_loss(half, labels, neg, fused=True)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(supcon_loss(half, labels, neg).item(), rel=FP32_REL)
