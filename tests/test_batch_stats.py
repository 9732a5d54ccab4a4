"""Negative-only images and batch normalisation: they never enter the labelled images' batch
statistics nor the running averages (supcon.LabelledFirst, around the model train.forward
calls). So a ResNet run with negatives at --negative-weight 0 trains exactly the
weights of the run without them, as the small CNN (no batch norm) always did."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import supcon
import train
from helpers import assert_same_weights
from test_data import write_folder
from test_negative_data import write_negatives

RUN = ["--model", "resnet18", "--image-size", "16", "--ood-classes", "cat", "--train-steps", "2",
       "--batch-size", "8", "--negatives-per-batch", "0.5", "--linear-epochs", "1",
       "--device", "cpu", "--no-report", "--seed", "3"]


@pytest.fixture(params=[1, 2])
def threads(request):
    """One and two CPU threads: with several, oneDNN splits a convolution's sums among the
    threads at points that depend on the batch's size, so a single pass over labelled and
    negative rows would round differently from the labelled rows alone; the labelled rows' own
    pass (LabelledFirst) is the same computation at any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


def test_resnet_run_with_negatives_at_weight_0_equals_the_run_without(tmp_path, threads):
    write_folder(tmp_path / "imgs", per_class=8, size=16)
    write_negatives(tmp_path / "neg")  # 6 random photographs, 4 of every anchor, 2 of ant's
    base = ["--data", str(tmp_path / "imgs"), *RUN, "--out", str(tmp_path / "runs")]
    plain = train.main([*base, "--name", "plain"])
    negatives = train.main([*base, "--name", "neg", "--negative-data", str(tmp_path / "neg"),
                            "--negative-mode", "denominators", "--negative-weight", "0"])
    # every parameter and every buffer: the BN running means, variances and batch counts too
    assert_same_weights(tmp_path / "runs" / "plain", tmp_path / "runs" / "neg",
                        parts=("model", "classifier"))
    state = torch.load(tmp_path / "runs" / "neg" / "model.pt", weights_only=True)["model"]
    assert any(k.endswith("running_var") for k in state)  # the model had batch norm to test
    for key in ("test_accuracy", "knn_accuracy", "ood_auroc_knn", "ood_auroc_msp"):
        assert plain[key] == negatives[key], key


def test_negative_rows_use_the_labelled_rows_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():  # affine parameters that are not the identity
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    reference = nn.BatchNorm2d(3, momentum=0.3)
    reference.load_state_dict(bn.state_dict())
    model = nn.Sequential(nn.Identity(), bn)
    n = 5  # labelled rows first, 4 negative-only rows after them, on a very different scale
    x = torch.cat([torch.randn(n, 3, 4, 4), 10 + 7 * torch.randn(4, 3, 4, 4)])
    out = supcon.LabelledFirst(model)(x, n)
    # the labelled rows: a plain train-mode BN on them alone, running averages from them alone
    assert torch.equal(out[:n], reference(x[:n]))
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var)
    assert int(bn.num_batches_tracked) == 1
    # the negative-only rows: the labelled rows' mean and biased variance over (N, H, W)
    mean = x[:n].double().mean((0, 2, 3))
    var = ((x[:n].double() - mean[None, :, None, None]) ** 2).mean((0, 2, 3))
    expected = F.batch_norm(x[n:].double(), mean, var, bn.weight.double(), bn.bias.double(),
                            training=False, eps=bn.eps)
    torch.testing.assert_close(out[n:].double(), expected, rtol=1e-5, atol=1e-5)
    # the layer is left as it was found: its own forward, on every row again
    assert "forward" not in vars(bn)
    plain = _plain_copy(bn)
    assert torch.equal(model(x), plain(x))


def test_a_shard_without_labelled_rows_uses_the_running_statistics_and_none_is_plain():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    before = _plain_copy(bn)
    x = torch.randn(3, 2, 4, 4)
    out = supcon.LabelledFirst(bn)(x, 0)  # no labelled row: nothing to borrow
    # eval-mode normalisation: the running statistics (to rounding: rsqrt and multiply here)
    torch.testing.assert_close(out, before.eval()(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(bn.running_mean, before.running_mean)  # and they stay as they were
    assert int(bn.num_batches_tracked) == 0
    out = supcon.LabelledFirst(bn)(x, None)  # None: the plain forward, every row
    assert torch.equal(out, before.train()(x))
    assert torch.equal(bn.running_mean, before.running_mean)


def _plain_copy(bn):
    copy = nn.BatchNorm2d(bn.num_features, momentum=bn.momentum)
    copy.load_state_dict(bn.state_dict())
    return copy
