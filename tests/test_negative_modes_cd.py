"""train.py --negative-mode head (c) and prototypes (d): their losses against loops written from
the papers' equations (float64), CIDER's EMA prototype update against a hand loop, the wiring
(no negative in Eq. 2), torchrun's gathered batch, the refusals, and tiny end-to-end runs that
resume exactly and that evaluate.py RUN evaluates again to the same numbers."""

import datetime
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import evaluate
import supcon
import train
from helpers import assert_same_weights, stop_at_call
from test_data import write_folder
from test_distributed import free_port
from test_inputs import assert_one_line, command
from test_negative_data import RUN, write_negatives


# -----------------------------------------------------------------------------
# The losses, against loops over samples and classes written from the equations (float64)

def loop_head_terms(f, labels, negative_only, kind, margins):
    """(CE, L_out) of logits f (B, V, K), every view a sample: Hendrycks et al. 2019's
    CE(f(x'), U) = -1/K sum_k log p_k(x'), or Liu et al. 2020's squared hinges on
    E(x) = -log sum_k exp f_k(x); one scalar torch op at a time, so autograd follows."""
    B, V, K = f.shape
    ce, oe, e_in, e_out = [], [], [], []
    for b in range(B):
        for v in range(V):
            row = [f[b, v, k] for k in range(K)]
            log_z = torch.log(sum(torch.exp(x) for x in row))  # log sum_k exp f_k
            if negative_only[b]:
                oe.append(-sum(x - log_z for x in row) / K)
                e_out.append(torch.clamp(margins[1] - (-log_z), min=0) ** 2)
            else:
                ce.append(-(row[labels[b]] - log_z))
                e_in.append(torch.clamp(-log_z - margins[0], min=0) ** 2)
    mean = lambda xs: sum(xs) / len(xs) if xs else torch.zeros((), dtype=f.dtype)  # noqa: E731
    return mean(ce), mean(oe) if kind == "oe" else mean(e_in) + mean(e_out)


@pytest.mark.parametrize("kind", supcon.HEAD_LOSSES)
def test_the_head_loss_is_its_equation(kind):
    g = torch.Generator().manual_seed(1)
    f = (3 * torch.randn(5, 2, 4, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 3, 1, 1, 2])
    negative_only = torch.tensor([False, True, False, True, False])
    margins = (-3.0, -1.5)  # with these logits, some hinges are active and some are not
    got = supcon.logit_head_loss(f, labels, negative_only, outlier_loss=kind, outlier_weight=0.3,
                                 ce_weight=0.7, margins=margins)
    ce, out = loop_head_terms(f, labels, negative_only, kind, margins)
    want = 0.7 * ce + 0.3 * out
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    if kind == "energy":  # the test means something: both kinds of hinge are on somewhere
        energy = -torch.logsumexp(f.detach(), 2)  # (B, V)
        e_in, e_out = energy[~negative_only], energy[negative_only]
        assert (e_in > margins[0]).any() and (e_out < margins[1]).any()  # active
        assert (e_in < margins[0]).any() or (e_out > margins[1]).any()  # and inactive
    grad, = torch.autograd.grad(got, f)
    want_grad, = torch.autograd.grad(want, f)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    # no negative in the batch: the outlier exposure term is 0, the ID hinge stays
    no_neg = torch.zeros(5, dtype=torch.bool)
    ce, out = loop_head_terms(f.detach(), labels, no_neg, kind, margins)
    alone = supcon.logit_head_loss(f.detach(), labels, no_neg, outlier_loss=kind,
                                   outlier_weight=0.3, ce_weight=0.7, margins=margins)
    assert torch.allclose(alone, 0.7 * ce + 0.3 * out, rtol=1e-12, atol=1e-12)


def loop_update(prototypes, z, labels, alpha):
    """CIDER's update, one row at a time: mu_y <- Normalize(alpha mu_y + (1 - alpha) z_n)."""
    mu = [prototypes[c].clone() for c in range(len(prototypes))]
    for n in range(len(z)):
        c = int(labels[n])
        m = alpha * mu[c] + (1 - alpha) * z[n]
        mu[c] = m / torch.sqrt((m * m).sum())  # written out, not F.normalize
    return torch.stack(mu)


def test_the_ema_prototype_update_is_the_hand_loop():
    g = torch.Generator().manual_seed(2)
    C, D = 5, 6
    prototypes = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)
    prototypes[3] = 0  # a class never seen: its first row becomes its prototype
    z = F.normalize(torch.randn(11, D, generator=g, dtype=torch.float64), dim=1)
    z.requires_grad_()
    labels = torch.tensor([3, 0, 0, 2, 3, 0, 2, 2, 2, 0, 3])  # class 1 absent, 4 absent
    before = prototypes.clone()
    got = supcon.update_prototypes(prototypes, z, labels, momentum=0.7)
    want = loop_update(prototypes, z, labels, 0.7)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(prototypes, before)  # the input is left as it was
    assert torch.equal(got[[1, 4]], before[[1, 4]])  # classes without rows keep theirs
    # the first update of an unseen class gives its row; every update is a unit vector
    first = supcon.update_prototypes(torch.zeros(C, D, dtype=torch.float64), z[:1], labels[:1], 0.7)
    assert torch.allclose(first[3], z[0].detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(got[[0, 2, 3]].norm(dim=1), torch.ones(3, dtype=torch.float64))
    # the gradient flows through every update, as the loop's
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    grad, = torch.autograd.grad((got * w).sum(), z)
    want_grad, = torch.autograd.grad((want * w).sum(), z)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12) and grad.abs().sum() > 0


def loop_dispersion(mu, tau):
    """L_dis = 1/C' sum_i log( 1/(C'-1) sum_{j != i} exp(mu_i . mu_j / tau) ), seen classes."""
    seen = [c for c in range(len(mu)) if float(mu[c].detach().norm()) > 0]
    terms = [torch.log(sum(torch.exp(mu[i] @ mu[j] / tau) for j in seen if j != i)
                       / (len(seen) - 1)) for i in seen]
    return sum(terms) / len(terms)


def loop_outlier(z_out, mu, tau):
    """L_out = mean over negatives n of log sum_c exp(mu_c . z_n / tau), seen classes."""
    seen = [c for c in range(len(mu)) if float(mu[c].detach().norm()) > 0]
    return sum(torch.log(sum(torch.exp(mu[c] @ z / tau) for c in seen)) for z in z_out) / len(z_out)


def test_the_prototype_loss_is_cider_dispersion_plus_the_outlier_term():
    g = torch.Generator().manual_seed(3)
    B, V, D, C = 6, 2, 5, 4
    features = torch.randn(B, V, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 0, 1, 3])
    negative_only = torch.tensor([False, False, False, True, False, True])
    prototypes = torch.zeros(C, D, dtype=torch.float64)
    prototypes[1] = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    tau, alpha, lam = 0.2, 0.6, 0.8
    loss, new = supcon.prototype_loss(features, labels, negative_only, prototypes, momentum=alpha,
                                      temperature=tau, outlier_weight=lam)
    # by hand: unit rows in view-major order (every first view, then the second views)
    rows = [(b, v) for v in range(V) for b in range(B)]
    z = {(b, v): features[b, v] / features[b, v].norm() for b, v in rows}
    real = [(b, v) for b, v in rows if not negative_only[b]]
    mu = loop_update(prototypes, [z[r] for r in real], [int(labels[b]) for b, _ in real], alpha)
    want = loop_dispersion(mu, tau) + lam * loop_outlier(
        [z[(b, v)] for b, v in rows if negative_only[b]], mu.detach(), tau)
    assert torch.allclose(loss, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(new, mu.detach(), rtol=1e-12, atol=1e-12) and not new.requires_grad
    assert torch.equal(new[3], torch.zeros(D, dtype=torch.float64))  # class 3: negatives only
    grad, = torch.autograd.grad(loss, features)
    want_grad, = torch.autograd.grad(want, features)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    # the outlier term moves the negatives, the dispersion term the labelled rows
    assert grad[negative_only].abs().sum() > 0 and grad[~negative_only].abs().sum() > 0


def test_dispersion_of_fewer_than_two_prototypes_is_zero_and_finite():
    mu = torch.zeros(3, 4, requires_grad=True)
    one = mu + torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    loss = supcon.dispersion_loss(one)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(mu.grad).all()


# -----------------------------------------------------------------------------
# The wiring: Eq. 2 on the labelled rows alone, the terms with the run's settings

def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(7, 2, 1, 8, 8, generator=g)  # (B, V, C, H, W)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    negative_only = torch.tensor([False] * 5 + [True] * 2)  # labelled rows first, as batches are
    return views, (labels, negative_only, torch.zeros(7, dtype=torch.bool))


def tiny_model(args, K=3):
    torch.manual_seed(0)
    model, classifier = supcon.build_model("cnn", "supcon", 1, 8, K, 16, **train.model_parts(args))
    return model.eval(), classifier  # no dropout: the same function twice


@pytest.mark.parametrize("flags", [["--negative-mode", "head", "--head-ce-weight", "0.3"],
                                   ["--negative-mode", "head", "--head-loss", "energy"],
                                   ["--negative-mode", "prototypes", "--prototype-weight", "2"]])
def test_no_negative_is_in_eq2_and_the_terms_get_the_settings(flags):
    args = train.with_defaults(train.build_parser().parse_args(["--embedding-dim", "16", *flags]))
    model, classifier = tiny_model(args)
    views, roles = tiny_batch()
    labels, negative_only, _ = roles
    loss_of = train.make_loss(args, torch.Generator().manual_seed(0), 3, model)
    out = train.forward(args, model, classifier, views)
    got = loss_of(out, *roles, None)
    z = out[0] if args.negative_mode == "head" else out
    want = supcon.supcon_loss_spec(z[:5], labels[:5], temperature=args.temperature)  # labelled
    if args.negative_mode == "head":
        assert out[1].shape == (7, 2, 3)  # the head's logits, every view
        assert args.head_weight == (0.5 if args.head_loss == "oe" else 0.1)  # the papers' lambda
        want = want + supcon.logit_head_loss(out[1], labels, negative_only,
                                             outlier_loss=args.head_loss,
                                             outlier_weight=args.head_weight,
                                             ce_weight=args.head_ce_weight,
                                             margins=train.ENERGY_MARGINS)
        assert not hasattr(loss_of, "commit")
    else:
        before = model.prototypes.clone()
        term, mu = supcon.prototype_loss(z, labels, negative_only, before, momentum=0.95,
                                         temperature=0.1, outlier_weight=2.0)
        want = want + term
        assert torch.equal(model.prototypes, before)  # not before the step's update ...
        loss_of.commit()
        assert torch.equal(model.prototypes, mu)  # ... then the step's new prototypes
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# torchrun: every rank's loss sees the gathered batch; gradients and prototypes as one process's

WORLD = 2
DDP_CASES = [["--negative-mode", "head"], ["--negative-mode", "head", "--head-loss", "energy"],
             ["--negative-mode", "prototypes"]]


def ddp_matches_one_process(rank, flags):
    args = train.with_defaults(train.build_parser().parse_args(["--embedding-dim", "16", *flags]))
    model, classifier = tiny_model(args)
    views, roles = tiny_batch(seed=4)  # 7 rows: shards of 4 and 3
    ref = tiny_model(args)[0]  # one process, the whole batch
    ref_loss_of = train.make_loss(args, None, 3, ref)
    ref_loss = ref_loss_of(train.forward(args, ref, classifier, views), *roles, None)
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    net = DistributedDataParallel(model)
    sizes = [len(part) for part in torch.arange(7).tensor_split(WORLD)]
    start = sum(sizes[:rank])
    loss_of = train.make_loss(args, None, 3, model)
    value = loss_of(train.forward(args, net, classifier, views[start:start + sizes[rank]], sizes),
                    *roles, sizes)
    value.backward()
    assert torch.allclose(value, ref_loss.detach(), rtol=1e-5, atol=1e-6), flags
    for p, g in zip(model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), (flags, (p.grad - g).abs().max())
    if hasattr(loss_of, "commit"):  # the same new prototypes on every rank, as one process's
        loss_of.commit()
        ref_loss_of.commit()
        assert torch.allclose(model.prototypes, ref.prototypes, rtol=1e-5, atol=1e-6)
        assert model.prototypes.norm() > 0


def ddp_worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        for flags in DDP_CASES:
            ddp_matches_one_process(rank, flags)
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_the_modes_see_the_whole_batch():
    mp.spawn(ddp_worker, args=(free_port(),), nprocs=WORLD, join=True)


# -----------------------------------------------------------------------------
# Runs: refusals, exact resume, evaluate.py RUN

@pytest.fixture
def folders(tmp_path):
    write_folder(tmp_path / "imgs", per_class=8, size=16)
    write_negatives(tmp_path / "neg", ant=0)  # no class sub-folder: these modes have no rule
    return str(tmp_path / "imgs"), str(tmp_path / "neg")


@pytest.mark.parametrize("extra,needles", [
    (["--negative-mode", "head", "--loss", "triplet"], ["--negative-mode head", "--loss supcon"]),
    (["--negative-mode", "prototypes", "--head-loss", "energy"],
     ["--head-loss has no effect with --negative-mode prototypes"]),
    (["--prototype-weight", "2"],
     ["--prototype-weight has no effect with --negative-mode score (the default with negatives"]),
    (["--negative-mode", "head", "--negative-weight", "0.5"],
     ["--negative-weight has no effect with --negative-mode head"]),
    (["--negative-mode", "prototypes", "--hard-negatives", "all"],
     ["--hard-negatives has no effect with --negative-mode prototypes"]),
    (["--negative-mode", "head", "class folders"], ["--negative-mode head", "class sub-folders"]),
])
def test_refused_in_one_line_leaving_no_run_folder(extra, needles, folders, tmp_path, capsys):
    imgs, neg = folders
    if "class folders" in extra:
        extra = extra[:-1]
        write_negatives(neg, flat=0, ant=1, other=0, seed=9)  # one negative in ant/: a class rule
    runs = tmp_path / "runs"
    code, err = command("train", ["--data", imgs, "--negative-data", neg, *RUN, *extra,
                                  "--out", str(runs)], capsys)
    assert_one_line(code, err, *needles)
    assert not runs.exists() or os.listdir(runs) == []


# (flags, what model.pt must hold beside the encoder and projection head)
MODES = [(["--negative-mode", "head"], "logit_head.weight"),
         (["--negative-mode", "head", "--head-loss", "energy"], "logit_head.weight"),
         (["--negative-mode", "prototypes"], "prototypes")]


@pytest.mark.parametrize("flags,part", MODES)
def test_a_run_resumes_exactly_and_evaluate_rebuilds_it(flags, part, folders, tmp_path,
                                                        monkeypatch):
    imgs, neg = folders
    args = ["--data", imgs, "--negative-data", neg, *RUN, "--epochs", "2", *flags,
            "--out", str(tmp_path)]  # 2 steps an epoch
    straight = train.main(args + ["--name", "straight"])
    # a Ctrl-C in the 2nd step after its loss (before backward), when (d) has computed its new
    # prototypes: the checkpoint must hold those of the 1st step, as it holds its weights
    real = stop_at_call(monkeypatch, torch.optim.AdamW, "zero_grad", 2)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--name", "cut"])
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 1) and part in state["model"]
    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", real)
    resumed = train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    assert_same_weights(tmp_path / "straight", tmp_path / "cut", ("model", "classifier"))
    saved = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert part in saved["model"]
    if part == "prototypes":  # both training classes have a unit prototype, moved by training
        assert torch.allclose(saved["model"]["prototypes"].norm(dim=1), torch.ones(2))
        assert not torch.equal(state["model"]["prototypes"], saved["model"]["prototypes"])
        assert "ood_auroc_head" not in straight
    else:  # the head's score is the arm's headline; the frozen probe's MSP stays beside it
        score = evaluate.HEAD_SCORES[saved["architecture"]["logit_head"]]
        assert straight["ood_auroc_head"] == straight["ood"]["held-out classes cat"][score]["auroc"]
        assert 0 <= straight["head_test_accuracy"] <= 1 and "ood_auroc_msp" in straight
    assert resumed["ood_auroc_knn"] == straight["ood_auroc_knn"]
    # evaluate.py RUN rebuilds the model from model.pt (the head, the prototypes) and agrees
    again = evaluate.main([str(tmp_path / "straight"), "--no-pictures"])
    for key in ("ood_auroc_knn", "ood_auroc_msp", "test_accuracy", "ood_auroc_head",
                "head_test_accuracy"):
        assert again.get(key) == straight.get(key), key
    with open(tmp_path / "straight" / "metrics.json", encoding="utf-8") as f:
        assert json.load(f).get("ood_auroc_head") == straight.get("ood_auroc_head")
