"""The default call supcon_loss(z, labels) -- chunk_size="auto" -- and SupConLoss() without
options: the rule that picks the path (supcon._auto_chunk_size, against a brute-force search for
the fewest blocks that fit), that the default call really takes the path the rule names, and that
it stays exact where each choice is made (one block; several blocks) against the specification
supcon_loss_spec run in float64: loss and gradients, second derivatives too. Explicit options
(chunk_size=None, an int, fused=True) keep their own paths.

Tolerances: float64 meets the spec to 1e-12; float32 sums N terms of size up to exp(1/tau) in
fp32 (eps 1.2e-7), so relative 1e-6 on the loss and 1e-5 of the largest gradient entry.
"""

import math

import pytest
import torch

import supcon
from supcon import SupConLoss, supcon_loss, supcon_loss_spec


def random_batch(B, V=2, D=16, classes=5, neg_fraction=0.25, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, V, D, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (B,), generator=g)
    neg = torch.rand(B, generator=g) < neg_fraction
    return feats, labels, neg


def count_anchors(labels, neg, views):
    """M: views of real images whose class has another real view (a positive), counted by hand."""
    real = [int(label) for label, n in zip(labels, neg) if not n]
    return sum(views for label in real if views > 1 or real.count(label) > 1)


@pytest.fixture
def paths(monkeypatch):
    """Records which denominator path each supcon_loss call takes, and the chunk it gets."""
    taken = []
    chunked, plain = supcon._LogDenominatorChunked.apply, supcon._log_denominator

    def spy_chunked(z, anchors, log_weight, temperature, chunk_size, roles):
        taken.append(("chunked", chunk_size, anchors.numel()))
        return chunked(z, anchors, log_weight, temperature, chunk_size, roles)

    def spy_plain(*args):
        taken.append(("plain", None, None))
        return plain(*args)

    monkeypatch.setattr(supcon._LogDenominatorChunked, "apply", spy_chunked)
    monkeypatch.setattr(supcon, "_log_denominator", spy_plain)
    return taken


# -----------------------------------------------------------------------------
# The rule itself (cheap)


def fewest_blocks_by_search(M, N, element_size, budget):
    """The fewest blocks k whose largest, ceil(M / k) rows of N entries, fits the budget (a
    block of one row always counts as fitting: nothing smaller exists)."""
    k = 1
    while math.ceil(M / k) > 1 and math.ceil(M / k) * N * element_size > budget:
        k += 1
    return k


@pytest.mark.parametrize("M,N", [(1, 2), (7, 8), (300, 400), (3072, 4096), (12288, 16384),
                                 (24576, 32768), (98304, 131072), (5, 10**9)])
@pytest.mark.parametrize("element_size", [4, 8])
@pytest.mark.parametrize("budget", [2**16, 2**24, 2**30, 5 * 10**9])
def test_the_rule_is_one_block_if_it_fits_else_the_fewest_equal_blocks(M, N, element_size,
                                                                       budget):
    c = supcon._auto_chunk_size(M, N, element_size, budget)
    assert 1 <= c <= M  # never more than the (M, N) logits the plain path makes
    assert c * N * element_size <= budget or c == 1  # each block fits (one row: the least)
    blocks = math.ceil(M / c)
    assert blocks == fewest_blocks_by_search(M, N, element_size, budget)
    if M * N * element_size <= budget:
        assert c == M  # one block, kept from forward to backward
    # equal blocks: the last one is not a sliver (the sizes differ by at most `blocks` rows)
    assert M - (blocks - 1) * c >= c - blocks


def test_the_budget_by_device():
    assert supcon._auto_block_bytes("cpu") == 2**30
    assert supcon._auto_block_bytes(torch.device("cpu")) == 2**30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA budget needs a CUDA GPU")
def test_the_budget_on_cuda_is_a_sixteenth_of_the_gpu():
    total = torch.cuda.get_device_properties(0).total_memory
    assert supcon._auto_block_bytes("cuda:0") == total // 16


def test_the_block_never_exceeds_the_references_n_by_n_matrices():
    # the reference code keeps several (N, N) fp32 matrices; the default's one block is at most
    # one of them, whatever the budget allows (M <= N anchors)
    for N in (2, 100, 4096, 16384, 65536, 262144):
        for M in (1, N // 2, N - 1, N):
            c = supcon._auto_chunk_size(max(M, 1), N, 4, supcon._auto_block_bytes("cpu"))
            assert c * N * 4 <= max(N * N * 4, N * 4)
            assert c * N * 4 <= 2**30 or c == 1


# -----------------------------------------------------------------------------
# The default call takes the path the rule names, and is exact there


def assert_matches_spec(x, labels, neg, dtype, call, **kwargs):
    """call(x) and its gradient against supcon_loss_spec in float64 on the same values."""
    x = x.detach().to(dtype).clone().requires_grad_()  # a leaf of its own, even from a view
    loss = call(x)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    expected = supcon_loss_spec(x64, labels, neg, **kwargs)
    expected.backward()
    assert loss.dtype == dtype
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert loss.item() == pytest.approx(expected.item(), rel=rel)
    scale = x64.grad.abs().max().item()
    atol = (1e-12 if dtype == torch.float64 else 1e-5) * scale
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hard_negatives", ["same_class", "all"])
def test_default_is_one_kept_block_and_exact(paths, dtype, hard_negatives):
    feats, labels, neg = random_batch(B=256, V=2, D=32, seed=1)  # N = 512
    M = count_anchors(labels, neg, views=2)
    kwargs = dict(temperature=0.1, hard_negatives=hard_negatives, negative_weight=0.5)
    assert_matches_spec(feats, labels, neg, dtype,
                        lambda x: supcon_loss(x, labels, neg, **kwargs), **kwargs)
    assert paths == [("chunked", M, M)]  # the default: every anchor in one block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 0.005])  # 0.005: the per-row maximum's shift
def test_default_in_several_blocks_is_exact(paths, monkeypatch, dtype, temperature):
    feats, labels, neg = random_batch(B=150, V=2, D=8, seed=2)  # N = 300
    N, M = 300, count_anchors(labels, neg, views=2)
    element_size = torch.finfo(dtype).bits // 8
    # a budget of 64 rows: the same rule as at N = 16384 x 1 GiB, on a batch small enough to test
    monkeypatch.setattr(supcon, "_AUTO_BLOCK_BYTES_CPU", 64 * N * element_size)
    kwargs = dict(temperature=temperature)
    assert_matches_spec(feats, labels, neg, dtype,
                        lambda x: supcon_loss(x, labels, neg, **kwargs), **kwargs)
    blocks = math.ceil(M / 64)
    assert blocks >= 3
    assert paths == [("chunked", math.ceil(M / blocks), M)]


def test_default_simclr_and_no_negatives_are_exact(paths):
    feats, labels, neg = random_batch(B=64, V=3, D=16, seed=3)
    assert_matches_spec(feats, None, neg, torch.float64,
                        lambda x: supcon_loss(x, None, neg, hard_negatives="all"),
                        hard_negatives="all")
    assert_matches_spec(feats[:, 0], labels, None, torch.float64,
                        lambda x: supcon_loss(x, labels))
    assert [p[0] for p in paths] == ["chunked", "chunked"]
    assert all(chunk == anchors for _, chunk, anchors in paths)


@pytest.mark.parametrize("several_blocks", [False, True])
def test_default_second_derivatives_match_the_spec(monkeypatch, several_blocks):
    # backward(create_graph=True): the kept block has no graph, so it must be recomputed
    if several_blocks:
        monkeypatch.setattr(supcon, "_AUTO_BLOCK_BYTES_CPU", 5 * 24 * 8)  # 5 rows of N = 24
    feats, labels, neg = random_batch(B=12, V=2, D=4, seed=4)
    hessian_vector = []
    for loss_fn in (supcon_loss, supcon_loss_spec):
        x = feats.clone().requires_grad_()
        grad, = torch.autograd.grad(loss_fn(x, labels, neg), x, create_graph=True)
        second, = torch.autograd.grad((grad ** 2).sum(), x)
        hessian_vector.append(second)
    torch.testing.assert_close(hessian_vector[0], hessian_vector[1], rtol=1e-10, atol=1e-12)


# -----------------------------------------------------------------------------
# SupConLoss without options; explicit options keep their paths


def test_supconloss_default_is_the_automatic_path_and_exact(paths):
    feats, labels, neg = random_batch(B=128, V=2, D=16, seed=5)
    M = count_anchors(labels, neg, views=2)
    criterion = SupConLoss()
    assert criterion.chunk_size == "auto"
    assert_matches_spec(feats, labels, neg, torch.float32,  # (bsz, 1) labels, as the reference
                        lambda x: criterion(x, labels[:, None], negative_only=neg),
                        temperature=0.07, base_temperature=0.07)
    assert paths == [("chunked", M, M)]


def test_explicit_options_keep_their_paths(paths):
    feats, labels, neg = random_batch(B=40, V=2, D=8, seed=6)
    M = count_anchors(labels, neg, views=2)
    expected = supcon_loss_spec(feats, labels, neg).item()
    assert supcon_loss(feats, labels, neg, chunk_size=None).item() == \
        pytest.approx(expected, rel=1e-12)
    assert supcon_loss(feats, labels, neg, chunk_size=7).item() == \
        pytest.approx(expected, rel=1e-12)
    assert SupConLoss(0.1, base_temperature=0.1, chunk_size=None)(feats, labels, None, neg) \
        .item() == pytest.approx(expected, rel=1e-12)
    assert SupConLoss(0.1, base_temperature=0.1, chunk_size=5)(feats, labels, None, neg) \
        .item() == pytest.approx(expected, rel=1e-12)
    assert paths == [("plain", None, None), ("chunked", 7, M), ("plain", None, None),
                     ("chunked", 5, M)]
    # fused=True with chunk_size left at "auto" (or None) is the fused path: neither of these
    paths.clear()
    assert supcon_loss(feats, labels, neg, fused=True).item() == pytest.approx(expected, rel=1e-10)
    assert supcon_loss(feats, labels, neg, fused=True, chunk_size=None).item() == \
        pytest.approx(expected, rel=1e-10)
    assert paths == []


@pytest.mark.parametrize("chunk_size", ["Auto", "fast", 0, -3, 2.0, True])
def test_bad_chunk_sizes_are_refused(chunk_size):
    feats, labels, _ = random_batch(B=6, V=2, D=4, seed=7)
    with pytest.raises(ValueError, match="chunk_size must be 'auto', None .* or a positive int"):
        supcon_loss(feats, labels, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        SupConLoss(chunk_size=chunk_size)
    with pytest.raises(ValueError, match="fused"):
        supcon_loss(feats, labels, fused=True, chunk_size=4)
