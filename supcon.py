"""
supcon.py -- supervised contrastive learning with near-out-of-distribution images as hard
negatives, in one file of plain PyTorch: the loss is Eq. 2 of Khosla et al. (2020), "Supervised
Contrastive Learning" (L_out^sup), extended with negative-only samples; labels=None gives
SimCLR's NT-Xent loss (Chen et al. 2020, Eq. 1). Beside it: two pair losses, encoders and heads.

Extended Eq. 2, for an anchor i (a real or in-distribution sample, never a negative-only one):

    L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} w_a exp(s_ia) )

    s_ij  = z_i . z_j / tau        z L2-normalised, tau the temperature
    P(i)  = samples with i's label (labels=None: the other views of i's image), i itself and
            negative-only samples excluded
    A(i)  : a in A(i) iff a != i and (a is not negative-only, or a is meant for i); a
            negative-only sample is meant for the anchors of its class (hard_negatives=
            "same_class"), for every anchor ("all"), or as its own rule says (a per-sample bool
            tensor: True = its class's anchors, False = every anchor)
    w_a   = negative_weight for negative-only samples, 1 otherwise

    L = mean of L_i over anchors with |P(i)| > 0     (times tau / base_tau if base_tau is given)

Without negative-only samples this is Eq. 2 of Khosla et al. (2020) as their code computes it
when every anchor has a positive (two views or more) and base_tau is given: the equation's sum
over anchors becomes a mean, which scales the loss but moves no minimum (their code also counts an
anchor without a positive as 0; here it leaves the mean).
A term outside the sets is removed exactly: -inf before the log-sum-exp, so exp() gives 0.

The loss needs torch alone (torchvision only for resnet()), so the file can be copied into any
project. Run it, or import it:

    python supcon.py             a tiny demonstration on random embeddings (CPU, about a second)
    python supcon.py --help      these notes and the demonstration's options

    from supcon import supcon_loss
    loss = supcon_loss(z, labels, negative_only, temperature=0.1)  # z: (B, V, D) or (N, D)

    from supcon import SupConLoss                                    # the reference code's API
    criterion = SupConLoss(temperature=0.07)
    loss = criterion(features, labels)                               # features (bsz, n_views, D)

What is here, in the order a reader of the papers meets it:

  1. supcon_loss_spec  extended Eq. 2 written as the paper writes it: the specification, beside
                       the rules its sets are built from (_eq2: anchors, P(i), A(i), w_a;
                       _flatten_views: views to rows, labels per row, each negative's rule).
     SupConLoss        the same as an nn.Module with the reference code's constructor and call.
     supcon_loss       the same value, fast and exact (what train.py calls): a group-sum
                       numerator, and denominators plain, chunked (blockwise, analytic gradient)
                       or fused (FlexAttention's log-sum-exp, Dong et al. 2024).
  2. triplet_loss      triplet margin loss with online mining: random, batch-hard (Hermans et al.
                       2017), hard-negative, semi-hard (Schroff et al. 2015, FaceNet), mixed.
  3. cosine_pair_loss  cosine-embedding loss on every pair of the batch.
  4. Encoders, heads   a small CNN, torchvision ResNets with a small-image stem, SupCon's projection
                       head, a 3-layer embedding head, and the encoder + head model;
                       LabelledFirst keeps negative-only rows out of batch norm's statistics
                       of the labelled rows.
  5. logit_head_loss   negative-only images outside the denominators (train.py --negative-mode):
     prototype_loss    a head trained with the encoder, class prototypes they are pushed from.
  Plumbing             the settings' checks, device copies and the demonstration, last.

Five ways to use the negative-only images (train.py --negative-mode, modes (a) to (e)):
  (a) denominators  the thesis's: terms of the anchors' denominators (A(i), w_a).
  (b) score         the encoder trains without them; evaluate.py's k-NN OOD score adds their
                    distance (SSD's few-shot score, Sehwag et al. 2021): nothing of it is here.
  (c) head          outside the denominators: a head trained with the encoder (below).
  (d) prototypes    outside the denominators: class prototypes they are pushed from (below).
  (e) classes       classes of their own: plain Eq. 2 over an extended label set (below).

Negatives as classes of their own (train.py --negative-mode classes, mode (e)): with K training
classes, a negative meant for class c's anchors is labelled K + c, one meant for every anchor 2K
(train.py's negative_classes), and negative_only is all False: every negative is an anchor whose
P(i) holds its other view and the negatives of its group, and it is an ordinary member of every
other anchor's A(i) (w = 1, no rule). This is the supervised CSI of Tack et al. (2020,
"sup-CSI": SupCLR on joint (class, shift) labels, each shifted class a class of its own), the
shift being "near-OOD / no class of ours"; supcon_loss computes it as it stands.

Negatives outside the denominators (train.py --negative-mode head and prototypes, modes (c) and
(d)): L_SupCon is Eq. 2 on the labelled rows alone, and the negative-only rows enter only this:
  head        a linear head f on the encoder features (LogitHead), trained with the encoder,
              read at test time by its own OOD score:
                L = L_SupCon + beta CE(f(x), y) + lambda L_out, the CE over the labelled rows;
                oe      L_out = E_x'[ -1/K sum_k log softmax_k f(x') ], cross-entropy to the
                        uniform distribution: outlier exposure (Hendrycks et al. 2019, Sec.
                        4.3's objective, which the paper does not number; lambda 0.5); score:
                        the head's MSP;
                energy  L_out = E_x[ max(0, E(x) - m_in)^2 ] + E_x'[ max(0, m_out - E(x'))^2 ],
                        E(x) = -log sum_k exp f_k(x), on the labelled rows x and the negatives
                        x': the energy-bounded learning objective (Liu et al. 2020; lambda 0.1,
                        m_in -25, m_out -7 in their CIFAR code; train.py's ENERGY_MARGINS
                        are -7, -3, for a head trained from scratch); score: -E(x).
  prototypes  unit class prototypes mu_c, CIDER's (Ming et al. 2023): moved by an exponential
              moving average of the labelled embeddings, mu_c <- Normalize(alpha mu_c + (1 -
              alpha) z), and pushed apart by their dispersion loss; the negatives are pushed away
              at once from every prototype:
                L = L_SupCon + L_dis + lambda L_out  (SupCon keeps each class compact, in place of
                                                      CIDER's L_comp),
                L_dis = 1/C sum_i log( 1/(C-1) sum_{j != i} exp(mu_i . mu_j / tau) ),
                L_out = E_n[ log sum_c exp(mu_c . z_n / tau) ] over negative-only embeddings z_n:
              minus the energy of Liu et al. (2020) with CIDER's class logits mu_c . z / tau for
              f, large when z_n is near any prototype; its gradient pushes z_n from each in
              proportion to its softmax weight, the nearest most. The OOD score stays k-NN.

Where it comes from. The main source is a thesis, "Contrastive Learning with Stable Diffusion-based
Data Augmentation": DA-Fusion (Trabucco et al. 2023) makes synthetic variations of each training
image; in-distribution ones join the positives, near-out-of-distribution (near-OOD) ones are meant
to act ONLY as hard negatives. Three seed projects contribute the rest, named here for short:
  - the fruit project: a course project that trained a small CNN on Stable-Diffusion fruit images
    (SmallCNN is its network);
  - the Siamese project: a Siamese-network project on MNIST and CIFAR-10 comparing a
    cosine-embedding pair loss with a triplet loss (cosine_pair_loss, triplet_margin);
  - the mushroom project: a metric-learning project for open-world mushroom classification with
    triplet mining (the strategies of mine_triplets, EmbeddingHead).

The thesis's own edit of the SupCon loss had three defects, all fixed here:
  defect 1  To exclude a pair, its logit was multiplied by zero after the row maximum had been
            subtracted. exp(0) = 1, so every excluded pair stayed in the denominator at full weight
            (as much as the most similar sample) instead of dropping out.
  defect 2  Near-OOD images were labelled -class_id to tell them apart. For class 0 that is -0 = 0,
            so class 0's near-OOD images became positives of class 0.
  defect 3  Near-OOD samples stayed anchors: each added its own L_i to the loss.
Here a separate bool vector, not the label, marks negative-only samples; they are never anchors and
never positives, and excluded pairs get -inf before the log-sum-exp, so exp() removes them exactly.
"""

import argparse
import contextlib
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The supervised contrastive loss, as Eq. 2 writes it (the specification)
#
# The rows and the sets, as every loss of this file lays them out (_flatten_views, _eq2):
#   rows      (B, V, D) views of B images are N = V*B rows, view-major: row v*B + b is view v of
#             image b (the reference code's order); labels, negative_only and a hard_negatives
#             tensor, one entry per image, are repeated for every view. (N, D): one view each.
#   anchors   rows that are not negative-only and have a positive (|P(i)| > 0).
#   P(i)      rows p != i, not negative-only, in i's group: its label (labels=None: its image).
#   A(i)      a in A(i) iff a != i and (a is not negative-only, or a is meant for i); a
#             negative-only a is meant for i iff its rule is "every anchor" (own_class[a] False)
#             or a is in i's group (own_class[a] True: "its own class's anchors only").
#   w_a       negative_weight if a is negative-only, else 1.


def supcon_loss_spec(features, labels=None, negative_only=None, *, temperature=0.1,
                     base_temperature=None, hard_negatives="same_class", negative_weight=1.0):
    """Extended Eq. 2 written the way the paper writes it, line by line: the specification that
    every faster path of this file is tested against. The arguments and value of supcon_loss
    (see there) but its path options; one (N, N) matrix of similarities, autograd's gradient,
    any dtype and device. One difference from the paper, as in the reference code: the mean over
    anchors where Eq. 2 sums, a scale that depends on the batch's size and moves no minimum."""
    _check_settings(temperature, base_temperature, hard_negatives, negative_weight, None, False)
    z, labels, negative_only, own_class, image_id = _flatten_views(
        features, labels, negative_only, hard_negatives=hard_negatives)
    _check_simclr(features, labels, own_class)
    group = image_id if labels is None else labels  # what positives share: label, or image
    same = group[:, None] == group[None, :]  # (N, N) i and j share a label (SimCLR: an image)
    return _eq2(z, same, negative_only, own_class, temperature, base_temperature,
                negative_weight)


def _eq2(z, same, negative_only, own_class, temperature, base_temperature, negative_weight,
         anchor_rows=None):
    """Eq. 2 from its sets. z (N, D) rows; same (N, N) bool: i and j share a group (a label, an
    image, or the user's mask; P(i) removes i and the negative-only samples below); own_class
    (N,) bool: the negative-only samples meant for their own class's anchors only (a subset of
    negative_only); anchor_rows (N,) bool: rows that may be anchors (None: all)."""
    z = F.normalize(_at_least_fp32(z), dim=1)  # unit rows, so z_i . z_j = cos(z_i, z_j)
    with torch.autocast(z.device.type, enabled=False):  # s in fp32 even under autocast
        s = z @ z.T / temperature  # (N, N) s_ij = z_i . z_j / tau
    N = len(z)
    other = ~torch.eye(N, dtype=torch.bool, device=z.device)  # (N, N) j != i
    real = ~negative_only  # (N,) may be an anchor or a positive; negative-only never (defect 3)
    P = other & same & real[:, None] & real[None, :]  # (N, N) P(i): positives (defect 2: bool)
    # A(i): a in A(i) iff a != i and (a is not negative-only, or a is meant for i: its rule is
    # "every anchor", or it is in i's group)
    meant_for = ~own_class[None, :] | same  # (N, N) [i, a]: a's rule admits anchor i
    A = other & (real[None, :] | meant_for)  # (N, N) A(i)
    log_w = torch.zeros(N, dtype=z.dtype, device=z.device)  # (N,) log w_a: 0, or log w
    log_w[negative_only] = math.log(negative_weight) if negative_weight > 0 else -math.inf
    # log( exp(s_ip) / sum_{a in A(i)} w_a exp(s_ia) ) for every pair: excluded entries are -inf
    # before the log-sum-exp, so exp() removes them exactly (defect 1)
    log_prob = s - torch.logsumexp((s + log_w).masked_fill(~A, -math.inf), dim=1, keepdim=True)
    num_positives = P.sum(1)  # (N,) |P(i)|
    L = -torch.where(P, log_prob, 0.0).sum(1) / num_positives.clamp(min=1)  # (N,) L_i
    # the mean (Eq. 2: the sum) runs over the anchors that have a positive
    anchors = real & (num_positives > 0)
    if anchor_rows is not None:
        anchors &= anchor_rows
    if not anchors.any():
        return z.sum() * 0.0  # nothing to contrast: 0, and backward() gives zero gradients
    loss = L[anchors].mean()
    return loss * (temperature / base_temperature) if base_temperature is not None else loss


def _flatten_views(features, labels, negative_only, name="features", device=None, *,
                   hard_negatives):
    """Turn (B, V, D) views or (N, D) rows into one (N, D) matrix plus per-row vectors, laid out
    as the notes at the head of this section say (every loss of this file reads its input here).

    Returns z (N, D), labels (N,) or None, negative_only (N,) bool, own_class (N,) bool (the
    negative-only rows that count for anchors of their own label only, from hard_negatives:
    "same_class", "all" or a per-image bool tensor) and image_id (N,). With views, row v*B + b
    holds view v of image b (view-major, like the reference code), and the per-image vectors are
    repeated for every view. The per-row vectors go to `device` (default: the features').
    """
    # the only two layouts with a meaning: rows of embeddings, or views of images
    if not torch.is_tensor(features) or features.dim() not in (2, 3):
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, D) or (B, V, D); got {shape}")
    if features.dim() == 3:
        B, V, D = features.shape
        z = features.transpose(0, 1).reshape(V * B, D)  # (V*B, D), view-major
    else:
        B, V = features.shape[0], 1  # every row is its own "image" with one view
        z = features  # (N, D)
    device = device or features.device
    image_id = torch.arange(B, device=device).repeat(V)  # (N,) which image each row shows

    def per_row(x, what):
        """A per-image vector (B,) repeated for each view -> (N,), in the row order of z."""
        if x is None:
            return None
        x = _to_device(torch.as_tensor(x), device)  # lists and numpy arrays are fine too
        if x.dim() != 1 or x.shape[0] != B:
            raise ValueError(
                f"{what} must have one entry per {'image' if features.dim() == 3 else 'row'} "
                f"of {name}: expected length {B}, got shape {tuple(x.shape)}")
        return x.repeat(V)  # (V*B,): [x, x, ..., x] matches the view-major rows

    labels = per_row(labels, "labels")  # (N,) or None
    negative_only = per_row(negative_only, "negative_only")  # (N,) or None
    if negative_only is None:  # no negative-only samples: every row may be an anchor
        negative_only = torch.zeros(z.shape[0], dtype=torch.bool, device=device)
    elif negative_only.dtype != torch.bool:  # 0/1 floats would silently mean something else
        raise ValueError(f"negative_only must be a bool tensor; got dtype {negative_only.dtype}")
    if torch.is_tensor(hard_negatives):  # a rule per sample: True = its own class's anchors only
        own_class = per_row(hard_negatives, "hard_negatives")
        if own_class.dtype != torch.bool:
            raise ValueError(f"hard_negatives as a tensor must be bool; got {own_class.dtype}")
        own_class = own_class & negative_only  # only negative-only samples have a rule
    else:  # one rule for every negative-only sample
        own_class = negative_only & (hard_negatives == "same_class")
    return z, labels, negative_only, own_class, image_id


def _check_simclr(features, labels, own_class):
    """Without labels (SimCLR) a row's positives are its image's other views, so there must be
    two views or more, and no negative-only sample can be restricted to 'its class'."""
    if labels is not None:
        return
    if features.dim() != 3 or features.shape[1] < 2:
        raise ValueError("labels=None (SimCLR) needs features of shape (B, V, D) with V >= 2 "
                         "views; pass labels for (N, D) features")
    if own_class.any():
        raise ValueError("hard_negatives='same_class' needs labels to know each negative-only "
                         "sample's class; pass labels or use hard_negatives='all'")


# -----------------------------------------------------------------------------
# ... as a module: a drop-in for the widely copied reference code


class SupConLoss(nn.Module):
    """A drop-in for the widely copied SupConLoss of Khosla et al.'s code (the one the thesis
    edited): the same constructor and call, so that swapping it into a project is one line:

        criterion = SupConLoss(temperature=0.07, contrast_mode="all", base_temperature=0.07)
        loss = criterion(features, labels)       # features (bsz, n_views, dim); or mask=...

    features:       (bsz, n_views, ...), flattened to (bsz, n_views, dim) as the reference does.
    labels:         (bsz,) or (bsz, 1) class labels: SupCon. mask: (bsz, bsz) of 0/1 (or bool),
                    mask[i, j] = 1 when image j is a positive of image i (it may be asymmetric;
                    a weighted mask, which the reference would multiply in, is refused).
                    Neither: SimCLR (the other views of the same image). Both: a ValueError, as
                    in the reference.
    contrast_mode:  "all": every view of every image is an anchor; "one": only the first view
                    of each image is (every view stays in the contrast set).
    negative_only:  (bsz,) bool, this project's addition: images that are never anchors and
                    never positives, only negatives (hard_negatives, negative_weight: as in
                    supcon_loss; a mask has no classes, so it needs hard_negatives="all").

    chunk_size:     supcon_loss's path: "auto" (default: chosen by size and device, the rule in
                    supcon_loss's docstring), None (plain) or an int (blocks of that many).

    A thin layer over this file's math: labels (or SimCLR) with contrast_mode "all" run through
    supcon_loss's fast exact path; a mask or contrast_mode "one" through the specification.
    Where it differs from the reference:
      - the features are L2-normalised here; the reference expects them normalised already
        (its training script does it), so on those inputs the values agree;
      - an anchor without a positive is left out of the mean; the reference counts it as 0,
        which lowers the mean (with two or more views every anchor has its other view);
      - the defaults are the reference's (tau 0.07, base_temperature 0.07), not those of
        supcon_loss (tau 0.1, no scaling).
    """

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07,
                 hard_negatives="same_class", negative_weight=1.0, chunk_size="auto"):
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one'; got {contrast_mode!r}")
        self.contrast_mode = contrast_mode
        self.settings = dict(temperature=temperature, base_temperature=base_temperature,
                             hard_negatives=hard_negatives, negative_weight=negative_weight)
        self.chunk_size = chunk_size  # supcon_loss's path: "auto", None (plain) or blocks of c
        _check_settings(**self.settings, chunk_size=chunk_size, fused=False)

    def forward(self, features, labels=None, mask=None, negative_only=None):
        """The loss of a batch of views; see the class's notes."""
        if not torch.is_tensor(features) or features.dim() < 3:
            raise ValueError("features must be (bsz, n_views, ...): at least 3 dimensions")
        features = features.flatten(2)  # (bsz, n_views, dim)
        if labels is not None and mask is not None:
            raise ValueError("cannot define both labels and mask")
        if torch.is_tensor(labels) and labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.flatten()  # (bsz, 1), which the reference takes too
        if mask is None and self.contrast_mode == "all":  # the fast exact path
            return supcon_loss(features, labels, negative_only, chunk_size=self.chunk_size,
                               **self.settings)
        B, V, _ = features.shape
        z, labels, negative_only, own_class, image_id = _flatten_views(
            features, labels, negative_only, hard_negatives=self.settings["hard_negatives"])
        if labels is not None:  # positives: the same label
            same = labels[:, None] == labels[None, :]
        elif mask is not None:  # the user's image-level mask, repeated for every view pair
            mask = torch.as_tensor(mask, device=z.device)
            if mask.shape != (B, B):
                raise ValueError(f"mask must be (bsz, bsz) = ({B}, {B}); got {tuple(mask.shape)}")
            if not ((mask == 0) | (mask == 1)).all():  # the reference would weight by it
                raise ValueError("mask must hold 0s and 1s (or bools); a weighted mask is not "
                                 "supported here")
            same = mask.bool()[image_id][:, image_id]  # (N, N)
        else:  # SimCLR: the other views of the same image
            same = image_id[:, None] == image_id[None, :]
        if labels is None and own_class.any():  # a mask or SimCLR has no classes
            raise ValueError("hard_negatives='same_class' needs labels; pass "
                             "hard_negatives='all' with a mask or without labels")
        first_view = torch.arange(B * V, device=z.device) < B  # rows v*B + b with v = 0
        return _eq2(z, same, negative_only, own_class, self.settings["temperature"],
                    self.settings["base_temperature"], self.settings["negative_weight"],
                    first_view if self.contrast_mode == "one" else None)


# -----------------------------------------------------------------------------
# ... fast and exact: what train.py runs
#
# Three rewrites of the same Eq. 2, each exact (tested against supcon_loss_spec):
#   the group-sum numerator  1/|P(i)| sum_{p in P(i)} s_ip = z_i . (S_g - z_i) / (tau |P(i)|),
#                            S_g the sum of the real embeddings of i's group g: the positive term
#                            needs O(N D) work and no (N, N) positive mask at all;
#   the chunked denominator  log sum_{a in A(i)} w_a exp(s_ia) in blocks of anchors, with its
#                            analytic gradient (_LogDenominatorChunked): O(chunk x N) memory;
#   the fused denominator    the same log-sum-exp as FlexAttention's (_flex_log_sum_exp): the
#                            kernel never writes the (M, N) similarities.


def supcon_loss(features, labels=None, negative_only=None, *, temperature=0.1,
                base_temperature=None, hard_negatives="same_class", negative_weight=1.0,
                chunk_size="auto", fused=False):
    """Extended Eq. 2 (Khosla et al. 2020, with negative-only samples added to A(i)), fast and
    exact: the value of supcon_loss_spec, computed as the notes above this function derive.

    features:        (N, D) embeddings, or (B, V, D) = V views of B images. L2-normalised here.
    labels:          (N,) or (B,) integer class labels; None = SimCLR (positives are the other
                     views of the same image, so features must then be (B, V>=2, D)).
    negative_only:   (N,) or (B,) bool. These samples (near-OOD synthetic images) are never
                     anchors and never positives; they only enlarge the denominators of the
                     anchors they are meant for (see hard_negatives).
    temperature:     tau in s_ij = z_i . z_j / tau.
    base_temperature: if given, the loss is multiplied by tau / base_temperature (the reference
                     code's constant factor); default None = no scaling.
    hard_negatives:  "same_class": a negative-only sample of class k enters the denominators of
                     class-k anchors only (the thesis's hard-negative masking); "all": of every
                     anchor; or a bool tensor (N,) / (B,), a rule per sample (True: its class's
                     anchors only, False: every anchor), for two kinds of negatives in one batch
                     (e.g. synthetic near-OOD images of a class, real photographs of no class).
                     Entries of samples that are not negative-only are ignored.
    negative_weight: w >= 0, the factor on a negative-only sample's exp-term in the denominator.
    chunk_size, fused: which path computes the denominators (M anchors, N samples); all exact:
      auto     (the default, chunk_size="auto") the chunked path, its chunk chosen from M, N, the
               dtype and the device (_auto_chunk_size, which says why): all M anchors in one
               (M, N) block if it fits a budget (1 GiB on the CPU, 1/16 of the GPU's memory on
               CUDA), kept from forward for backward; else the fewest equal blocks that fit.
               Peak memory: one block (element size x c x N bytes, c <= M <= N) plus O(N D).
               fused is never chosen (not yet timed on a GPU; its first call compiles).
      plain    (chunk_size=None) one masked (M, N) matrix, autograd's gradient; any device and
               dtype.
      chunked  (chunk_size=c) in (c, N) blocks with an analytic gradient: O(c N) memory, for
               large batches; what train.py uses.
      fused    (fused=True) FlexAttention's log-sum-exp, torch.compile'd on a CUDA GPU: the
               kernel never writes the (M, N) scores. On the CPU it runs the forward only
               (uncompiled, the scores materialised) and backward() raises.

    Returns a scalar: the mean of L_i over anchors that have at least one positive, or 0 (with
    zero gradients) when no anchor has one. Half-precision input is computed in fp32.
    """
    _check_settings(temperature, base_temperature, hard_negatives, negative_weight, chunk_size,
                    fused)
    # ---- flatten: z (N, D) with N = V*B rows; labels, negative_only, image_id (N,)
    # the per-row vectors stay where the labels are: CPU labels keep the bookkeeping on the CPU
    z, labels, negative_only, own_class, image_id = _flatten_views(
        features, labels, negative_only, device=labels.device if torch.is_tensor(labels) else None,
        hard_negatives=hard_negatives)
    _check_simclr(features, labels, own_class)
    # what positives share: the label (SupCon), or the image (SimCLR: the other views of it).
    # Hard-negative masking compares it too (SimCLR allows only "all", which compares nothing).
    group_label = image_id if labels is None else labels  # (N,)

    # fp32 at least: fp16 logits at tau = 0.01 would overflow exp() and lose precision
    z = F.normalize(_at_least_fp32(z), dim=1)  # (N, D) unit rows: z_i . z_j = cos(z_i, z_j)
    found = _anchors_and_roles(group_label, negative_only, own_class, z.device)
    if found is None:
        # nothing to contrast: 0 (fp32), with a graph so that backward() gives zero gradients
        return z.sum() * 0.0
    anchors, roles = found
    mean_positive_logit = _mean_positive_logit(z, anchors, roles, temperature)  # (M,)
    log_denominator = _log_denominator_by_path(z, anchors.rows, roles, temperature,
                                               negative_weight, chunk_size, fused)  # (M,)

    # ---- -1/|P| sum_p log(exp(s_ip) / den_i) = log den_i - 1/|P| sum_p s_ip, mean over anchors
    loss = (log_denominator - mean_positive_logit).mean()  # scalar
    if base_temperature is not None:  # the reference code's constant factor tau / base_tau
        loss = loss * (temperature / base_temperature)
    return loss


class _Anchors(NamedTuple):
    """The anchors that count and their groups, on z's device (made by _anchors_and_roles)."""
    rows: torch.Tensor  # (M,) row indices of the anchors: real rows that have a positive
    num_positives: torch.Tensor  # (M,) |P(i)| >= 1
    group: torch.Tensor  # (M,) each anchor's group among the G groups
    real_group: torch.Tensor  # (R,) each real row's group
    num_groups: int  # G


class _Roles(NamedTuple):
    """Which rows of z play which role in the denominator, on z's device (made by supcon_loss)."""
    real: torch.Tensor  # (R,) rows that are not negative-only; the anchors are among them
    negative: torch.Tensor  # (K,) negative-only rows
    position: torch.Tensor  # (N,) a real row's column among the R real ones
    group_label: torch.Tensor  # (N,) the label (SimCLR: the image) hard-negative masking compares
    negative_only: torch.Tensor  # (N,) bool
    own_class: torch.Tensor  # (N,) bool: negative-only rows that count for their label's anchors
    has_negatives: bool  # K > 0, known without asking the GPU
    has_own_class: bool  # own_class has a True entry


def _anchors_and_roles(group_label, negative_only, own_class, device):
    """The anchors and positives from the group sizes alone (O(N), no N x N matrix), and the
    columns' roles, as (_Anchors, _Roles) on `device` (z's); None when no anchor has a positive.

    Defects 2 and 3 (the end of this file's docstring) end here: negative-only rows are neither
    anchors (not in real_rows) nor positives (not counted in any group), whatever label they
    carry. The sizes depend on the data, so on a GPU each line would wait for the GPU to catch
    up; with the labels on the CPU (as train.py passes them) nothing waits."""
    real_rows = torch.nonzero(~negative_only).squeeze(1)  # (R,) the samples that can be anchors
    negative_rows = torch.nonzero(negative_only).squeeze(1)  # (K,) the negative-only samples
    # group_index[r]: real sample r's group among the G groups; group_size: real samples per group
    _, group_index, group_size = torch.unique(group_label[real_rows], return_inverse=True,
                                              return_counts=True)
    num_positives = group_size[group_index] - 1  # (R,) |P(i)|: i's group minus i itself
    has_positive = num_positives > 0  # an anchor without a positive is left out of the mean
    if not has_positive.any():
        return None
    # the index vectors the math uses, copied to the embeddings' device without waiting
    on_z = lambda t: _to_device(t, device)  # noqa: E731 (a no-op on the same device)
    anchors = _Anchors(rows=on_z(real_rows[has_positive]),
                       num_positives=on_z(num_positives[has_positive]),
                       group=on_z(group_index[has_positive]), real_group=on_z(group_index),
                       num_groups=group_size.numel())
    roles = _Roles(real=on_z(real_rows), negative=on_z(negative_rows),
                   position=on_z(torch.cumsum(~negative_only, 0) - 1),
                   group_label=on_z(group_label), negative_only=on_z(negative_only),
                   own_class=on_z(own_class), has_negatives=negative_rows.numel() > 0,
                   has_own_class=bool(own_class.any()))  # on the labels' device: no GPU wait
    return anchors, roles


def _mean_positive_logit(z, anchors, roles, temperature):
    """The positive term 1/|P(i)| sum_{p in P(i)} s_ip of the M anchors, (M,), from group sums:
    sum_{p in P(i)} z_i . z_p = z_i . (S_g - z_i), with S_g the sum of the real embeddings of
    i's group g, so the numerator needs no N x N matrix at all."""
    group_sum = torch.zeros(anchors.num_groups, z.shape[1], dtype=z.dtype, device=z.device)
    group_sum = group_sum.index_add(0, anchors.real_group, z[roles.real])  # (G, D) S_g
    z_anchor = z[anchors.rows]  # (M, D)
    # index_select, not group_sum[...]: the anchors repeat groups, and the backward of indexing
    # with repeats (an accumulating index_put) adds in a thread-dependent order on the CPU
    positive_sum = group_sum.index_select(0, anchors.group) - z_anchor  # (M, D) sum_p z_p
    return (z_anchor * positive_sum).sum(1) / temperature / anchors.num_positives  # (M,)


def _log_denominator_by_path(z, anchor_rows, roles, temperature, negative_weight, chunk_size,
                             fused):
    """The denominators log sum_{a in A(i)} w_a exp(s_ia) of the M anchors whose row indices
    are anchor_rows (M,) (the rows of supcon_loss's _Anchors), (M,),
    by the path chunk_size and fused choose (supcon_loss's docstring)."""
    # log w_a per column: log w for negative-only columns, 0 for the rest; None when w = 1
    # everywhere (the common case: one pass over the logits saved)
    log_weight = None
    if negative_weight != 1.0 and roles.has_negatives:
        log_w_negative = math.log(negative_weight) if negative_weight > 0 else -math.inf
        log_weight = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device).masked_fill_(
            roles.negative_only, log_w_negative)  # (N,)
    if chunk_size == "auto" and not fused:  # the default: the rule in supcon_loss's docstring
        chunk_size = _auto_chunk_size(anchor_rows.numel(), z.shape[0], z.element_size(),
                                      _auto_block_bytes(z.device))
    # inside torch.autocast the products would run in bf16/fp16: the loss keeps them in fp32
    with torch.autocast(z.device.type, enabled=False):
        if fused:  # FlexAttention: no (M, N) matrix in memory (CUDA)
            return _log_denominator_fused(z, anchor_rows, log_weight, temperature, roles)
        if chunk_size is None:  # one (M, N) matrix, autograd's gradient
            return _log_denominator(z, anchor_rows, log_weight, temperature, roles)
        # (chunk_size, N) blocks, analytic gradient
        return _LogDenominatorChunked.apply(z, anchor_rows, log_weight, temperature, chunk_size,
                                            roles)


_AUTO_BLOCK_BYTES_CPU = 2**30  # the default path's budget for one (c, N) block on the CPU
_AUTO_BLOCK_GPU_SHARE = 16  # on CUDA: 1/16 of the GPU's memory (an H100's: 5 GB)


def _auto_block_bytes(device):
    """The largest (c, N) block chunk_size="auto" may allocate on `device`, in bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // _AUTO_BLOCK_GPU_SHARE
    return _AUTO_BLOCK_BYTES_CPU  # the CPU, and any other device


def _auto_chunk_size(num_anchors, num_columns, element_size, budget):
    """chunk_size="auto" (supcon_loss's docstring): all M = num_anchors anchors in one (M, N)
    block when M x N x element_size bytes fit the budget -- one block is kept from forward to
    backward, so none is recomputed -- else the fewest equal blocks that each fit. Never more
    than M, so the block never exceeds the (M, N) logits the plain path makes itself.

    Why one block: it was the fastest measured, at N = 4096 on a 2-core CPU (4.5x the
    reference-style loss; blocks of 1024 3.9x, the plain path 1.8x), at N = 16384 on one CPU
    thread (1.45x faster than blocks of 2048 or 4096) and at N = 16384 on an H100 (3.2x; blocks
    of 4096 2.3x, plain 2.0x). Memory (benchmarks/bench_loss.py --memory-n, D = 128, CPU): the
    reference keeps about 9 N x N fp32 matrices, this path one block of at most N x N plus a
    dozen (N, D) copies of the embeddings -- 0.15 of the reference's peak at N = 2048, 0.10 at
    N = 16384. Below N = 2 D those copies weigh as much as the reference's N x N matrices (every
    path of supcon_loss has them): at N = 128 the two peaks are within 0.3 MiB, either way."""
    rows_that_fit = max(1, budget // (num_columns * element_size))  # anchors per block
    blocks = -(-max(num_anchors, 1) // rows_that_fit)  # ceil(M / rows_that_fit) >= 1
    return -(-max(num_anchors, 1) // blocks)  # ceil(M / blocks) <= rows_that_fit


def _masked_logits(z, anchors, log_weight, temperature, roles):
    """s_ia + log w_a for the anchors whose row indices are `anchors` (c,) against all N columns, -inf where a is not
    in A(i). Returns a (c, N) matrix; exp() of an excluded entry is exactly 0."""
    logits = (z[anchors] / temperature) @ z.T  # (c, N) s_ia = z_i . z_a / tau
    if log_weight is not None:
        logits = logits + log_weight  # exp(s + log w) = w exp(s)
    columns = torch.arange(z.shape[0], device=z.device)  # (N,)
    excluded = anchors[:, None] == columns[None, :]  # (c, N) a = i: the anchor itself
    if roles.has_own_class:
        # a negative-only sample of another class than the anchor's is not in A(i), unless its
        # rule is "every anchor" (hard_negatives "all", or False in a per-sample tensor)
        other_class = roles.group_label[anchors][:, None] != roles.group_label[None, :]  # (c, N)
        excluded |= roles.own_class[None, :] & other_class
    # -inf, not a multiplication by 0 after the max-shift: defect 1 (this file's docstring)
    return logits.masked_fill(excluded, -math.inf)  # (c, N)


def _log_denominator(z, anchors, log_weight, temperature, roles):
    """Plain path: log sum_{a in A(i)} w_a exp(s_ia) for all M anchors at once; autograd does the
    gradient. logsumexp subtracts each row's maximum, so tau = 0.01 (|s| <= 100) cannot overflow."""
    logits = _masked_logits(z, anchors, log_weight, temperature, roles)  # (M, N)
    return torch.logsumexp(logits, dim=1)  # (M,)


class _LogDenominatorChunked(torch.autograd.Function):
    """The same log-denominators, computed over blocks of chunk_size anchors, analytic gradient.

    Never holds more than a (chunk_size, N) block. With p_ia = w_a exp(s_ia) / sum_{b in A(i)}
    w_b exp(s_ib) (0 outside A(i)), the gradient of sum_i g_i * log_denominator_i is
        dL/ds_ia = g_i p_ia,      dL/dZ = (G + G^T) Z / tau   (G the (M, N) matrix g_i p_ia,
    scattered to anchor rows), which backward accumulates block by block after recomputing each
    block's logits (recompute instead of store, as in FlashAttention, Dao et al. 2022).

    This is the path train.py uses, so it touches each (c, N) block as few times as possible
    (the block is far larger than anything else here; the time goes into reading it):
      - the columns are split into real samples (R) and negative-only ones (K). The only masks
        that depend on the anchor are then its own column (c entries, set by index) and, with
        "same_class", a (c, K) class mask on the negative-only block;
      - rows are unit vectors, so s_ia <= 1/tau and every real term exp(s_ia - 1/tau) lies in
        [exp(-2/tau), 1]: nothing overflows, and for tau >= 2/77 (fp32; fp64: tau >= 2/698)
        nothing underflows either. The shift 1/tau is then a constant that rides in the bias of
        the matrix product (addmm) with log w_a, and no row maximum is needed. For smaller tau
        each row is shifted by its own maximum, as logsumexp does (two passes more);
      - backward scales the small (c, D) matrices by g_i / (tau den_i), never the block itself;
      - when every anchor fits in one block, forward keeps it for backward (no recomputation).
    """

    @staticmethod
    def forward(ctx, z, anchors, log_weight, temperature, chunk_size, roles):
        """(M,) log-denominators, computed `chunk_size` anchors at a time."""
        columns = _DenominatorColumns(z, log_weight, temperature, roles)
        log_denominator = []
        for s in range(0, anchors.numel(), chunk_size):
            blocks = None  # the last block goes before the next is made: one alive, not two
            # [(c, R), (c, K)]: s_ia + log w_a - shift, -inf off A(i)
            blocks = columns.logits(anchors[s:s + chunk_size])
            row_shift = 0.0  # with the fixed shift every term is in [exp(-2/tau), w] already
            if not columns.fixed_shift:  # small tau: each row's own maximum              (c,)
                row_shift = torch.stack([b.amax(1) for b in blocks]).amax(0)
                blocks = [b.sub_(row_shift[:, None]) for b in blocks]
            blocks = [b.exp_() for b in blocks]  # E_ia = w_a exp(s_ia - offset_i), 0 off A(i)
            denominator = sum(b.sum(1) for b in blocks)  # (c,) sum_a E_ia
            log_denominator.append(denominator.log() + row_shift + columns.shift)  # (c,)
        log_denominator = torch.cat(log_denominator)  # (M,)
        # backward needs only O(N D + M): the embeddings and each row's log-denominator --
        # unless all anchors fit in one block: that block is allocated anyway, so keep it
        ctx.save_for_backward(z, anchors, log_weight, log_denominator)
        ctx.roles = roles  # index vectors made inside supcon_loss (no gradient, never modified)
        ctx.settings = (temperature, chunk_size)  # plain Python values
        ctx.kept = (blocks, row_shift + columns.shift) if anchors.numel() <= chunk_size else None
        return log_denominator  # (M,)

    @staticmethod
    def backward(ctx, grad_log_denominator):
        """dL/dZ = (G + G^T) Z / tau with G_ia = g_i p_ia, accumulated block by block."""
        z, anchors, log_weight, log_denominator = ctx.saved_tensors
        temperature, chunk_size = ctx.settings
        columns = _DenominatorColumns(z, log_weight, temperature, ctx.roles)
        kept, ctx.kept = ctx.kept, None  # (the block goes with this call)
        if torch.is_grad_enabled():  # create_graph=True: forward's block has no graph to z, so
            kept = None  # recompute it under autograd, or second derivatives would be wrong
        with torch.autocast(z.device.type, enabled=False):  # backward() may run under autocast
            grad_z = torch.zeros_like(z)  # (N, D)
            grad_columns = [torch.zeros_like(z_c) for z_c in columns.z_columns]  # (R|K, D)
            for s in range(0, anchors.numel(), chunk_size):
                blocks = None  # the last block goes before the next is made: one alive, not two
                anchor_block = anchors[s:s + chunk_size]  # (c,)
                log_den = log_denominator[s:s + chunk_size]  # (c,)
                # E_ia = w_a exp(s_ia - offset_i), 0 off A(i): forward's block, or recomputed
                if kept is not None:
                    blocks, offset = kept
                elif columns.fixed_shift:
                    blocks = [b.exp_() for b in columns.logits(anchor_block)]
                    offset = columns.shift
                else:  # offset = the log-denominator itself: E_ia = p_ia, at most 1
                    offset = log_den
                    blocks = [b.sub_(offset[:, None]).exp_()
                              for b in columns.logits(anchor_block)]
                # p_ia = E_ia exp(offset_i - log den_i), so G_ia / tau = scale_i E_ia     (c, 1)
                g = grad_log_denominator[s:s + chunk_size]  # (c,) g_i
                scale = (g * (offset - log_den).exp() / temperature)[:, None]
                # G Z / tau on the anchors' own rows: scale_i sum_a E_ia z_a               (c, D)
                grad_z.index_add_(0, anchor_block, scale * sum(
                    b @ z_c for b, z_c in zip(blocks, columns.z_columns)))
                # G^T Z / tau on every column: sum_i E_ia (scale_i z_i)                  (R|K, D)
                scaled_anchors = scale * z[anchor_block]  # (c, D)
                for grad, b in zip(grad_columns, blocks):
                    grad.addmm_(b.T, scaled_anchors)
            for column_index, grad in zip(columns.column_index, grad_columns):
                grad_z.index_add_(0, column_index, grad)  # back to each sample's own row
            return grad_z, None, None, None, None, None  # only z needs a gradient


class _DenominatorColumns:
    """The columns a of the chunked denominator, split into real samples and negative-only ones,
    with what every block of anchors needs: their embeddings, the bias log w_a - shift, masks."""

    def __init__(self, z, log_weight, temperature, roles):
        self.z, self.temperature = z, temperature
        # exp(s - 1/tau) >= exp(-2/tau) must stay a normal float (10: a margin of e^10)
        self.fixed_shift = 2 / temperature <= -math.log(torch.finfo(z.dtype).tiny) - 10
        self.shift = 1 / temperature if self.fixed_shift else 0.0
        # (R,) real samples, (K,) negative-only ones; no empty (c, 0) block when K = 0
        self.column_index = [roles.real] + ([roles.negative] if roles.has_negatives else [])
        self.z_columns = [z[i] for i in self.column_index]  # (R, D), (K, D)
        bias = torch.full((z.shape[0],), -self.shift, dtype=z.dtype, device=z.device)  # (N,)
        if log_weight is not None:
            bias = bias + log_weight
        self.bias = [bias[i] for i in self.column_index]  # (R,), (K,): contiguous, for addmm
        self.position = roles.position  # (N,)
        self.group_label = roles.group_label  # (N,)
        # a negative-only column with the own-class rule counts only for anchors of its class
        self.negative_label = roles.group_label[roles.negative]  # (K,)
        self.negative_own_class = roles.own_class[roles.negative] if roles.has_own_class \
            else None  # (K,) bool; None: every negative-only column counts for every anchor

    def logits(self, anchor_block):
        """[(c, R), (c, K)]: s_ia + log w_a - shift for the anchors `anchor_block` (c,), -inf off
        A(i) (removed exactly, not zeroed: defect 1, this file's docstring)."""
        z_anchor = self.z[anchor_block] / self.temperature  # (c, D) z_i / tau
        blocks = [torch.addmm(bias, z_anchor, z_c.T)  # bias + z_i . z_a / tau
                  for bias, z_c in zip(self.bias, self.z_columns)]
        # a = i: the anchor's own column (c entries, by index: no (c, R) mask is built)
        block_row = torch.arange(len(anchor_block), device=anchor_block.device)  # (c,)
        blocks[0][block_row, self.position[anchor_block]] = -math.inf
        if len(blocks) > 1 and self.negative_own_class is not None:
            # a negative-only sample of another class than the anchor's is not in A(i)     (c, K)
            anchor_label = self.group_label[anchor_block]  # (c,)
            other_class = anchor_label[:, None] != self.negative_label[None, :]
            blocks[1].masked_fill_(other_class & self.negative_own_class[None, :], -math.inf)
        return blocks


# -----------------------------------------------------------------------------
# The fused path: the denominators as FlexAttention's log-sum-exp (Dong et al. 2024)

_COMPILED = {}  # torch.compile'd FlexAttention functions by name, made on first use on CUDA

_NO_CPU_BACKWARD = ("supcon_loss(fused=True): the fused path's gradient needs a CUDA GPU "
                    "(FlexAttention has no backward on the CPU); use chunk_size=... instead")


def _log_denominator_fused(z, anchors, log_weight, temperature, roles):
    """Fused path: the (M,) log-denominators from FlexAttention. On CUDA autograd differentiates
    through the compiled kernels; elsewhere only the forward exists and backward() raises."""
    if z.device.type == "cuda":
        return _flex_log_sum_exp(z, anchors, log_weight, temperature, roles)
    return _FusedForwardOnly.apply(z, anchors, log_weight, temperature, roles)


class _FusedForwardOnly(torch.autograd.Function):
    """The fused forward off CUDA, where FlexAttention refuses inputs that need a gradient: it runs
    on detached embeddings here, and this function's backward stands in for the missing one."""

    @staticmethod
    def forward(ctx, z, anchors, log_weight, temperature, roles):
        """(M,) log-denominators, no graph through FlexAttention."""
        return _flex_log_sum_exp(z.detach(), anchors, log_weight, temperature, roles)

    @staticmethod
    def backward(ctx, grad_log_denominator):
        """Refuses, with one line that says what to do instead."""
        raise RuntimeError(_NO_CPU_BACKWARD)


def _flex_log_sum_exp(z, anchors, log_weight, temperature, roles):
    """log sum_{a in A(i)} w_a exp(s_ia) for the M anchors, as attention's log-sum-exp (LSE).

    Attention with queries q_i = z_i (the anchors), keys k_a = z_a (all N samples) and scale 1/tau
    scores s_ia = z_i . z_a / tau; its LSE_i = log sum_a exp(score_ia) over the entries the mask
    keeps is the denominator itself once score_mod adds log w_a (exp(s + log w) = w exp(s); log 0
    = -inf removes a column exactly) and mask_mod drops every a not in A(i). The attention output
    (over dummy zero values) is thrown away.

    On CUDA both FlexAttention functions run through torch.compile, wrapped once per process;
    torch.compile then keeps a kernel per dtype, temperature and shape (by default, once it has
    seen a second batch size, one for any size). The masking settings and weights live in tensors
    read by the one mask_mod and score_mod, so they add no variants. fp32 follows torch's float32
    matmul precision. Elsewhere the functions run uncompiled: the (M, N) scores are materialised,
    fine for checking the values.
    """
    from torch.nn.attention import flex_attention as flex  # PyTorch >= 2.5
    N, D = z.shape
    on_cuda = z.device.type == "cuda"
    if on_cuda and not _COMPILED:
        _COMPILED["flex_attention"] = torch.compile(flex.flex_attention)
        _COMPILED["create_block_mask"] = torch.compile(flex.create_block_mask)
    attend = _COMPILED["flex_attention"] if on_cuda else flex.flex_attention
    create_block_mask = _COMPILED["create_block_mask"] if on_cuda else flex.create_block_mask
    # the settings as vectors, not as Python branches inside the mods (each branch taken would
    # be one more compiled kernel)
    anchor_label = roles.group_label[anchors]  # (M,)
    # (N,) columns that count only for anchors of their own label: the negative-only samples
    # with the own-class rule (all of them under "same_class", none under "all")
    own_label_only = roles.own_class
    if log_weight is None:  # w = 1 everywhere: log w_a = 0
        log_weight = torch.zeros(N, dtype=z.dtype, device=z.device)

    def in_denominator(batch, head, q, a):
        """True where column a is in A(i) of the q-th anchor i (scalar int tensors q, a)."""
        other_label = roles.group_label[a] != anchor_label[q]
        return (anchors[q] != a) & ~(own_label_only[a] & other_label)  # a != i, not masked

    def add_log_weight(score, batch, head, q, a):
        """score + log w_a (0 for real columns, log w for negative-only ones)."""
        return score + log_weight[a]

    block_mask = create_block_mask(in_denominator, None, None, anchors.numel(), N, device=z.device)
    # (1 batch, 1 head, length, D); Triton's tl.dot wants dimensions of at least 16, and
    # zero-padding keeps every dot product the same
    queries, keys = z[anchors][None, None], z[None, None]  # (1, 1, M, D), (1, 1, N, D)
    if D < 16:
        queries, keys = F.pad(queries, (0, 16 - D)), F.pad(keys, (0, 16 - D))
    values = z.new_zeros(1, 1, N, 16)  # (1, 1, N, 16) attention needs values; output unused
    with warnings.catch_warnings():  # uncompiled off CUDA on purpose: no advice to compile
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        _, aux = attend(queries, keys, values,
                        score_mod=add_log_weight, block_mask=block_mask, scale=1.0 / temperature,
                        return_aux=flex.AuxRequest(lse=True))
    return aux.lse[0, 0].to(z.dtype)  # (M,) natural-log LSE; CUDA's kernel stores it in fp32


# -----------------------------------------------------------------------------
# 2. Triplet loss with online mining (the mushroom project)

MINING = ("random", "batch_hard", "hard_negative", "semi_hard", "mixed")


def pairwise_distances(x, distance="euclidean"):
    """(N, D) -> (N, N) distances: euclidean ||x_i - x_j||_2, or cosine 1 - cos(x_i, x_j); in
    x's precision even under torch.autocast (which would run the product in bf16 / fp16)."""
    with torch.autocast(x.device.type, enabled=False):
        if distance == "euclidean":
            return torch.cdist(x, x)  # (N, N) ||x_i - x_j||_2
        if distance == "cosine":
            x = F.normalize(x, dim=1)  # (N, D) unit rows
            return 1.0 - x @ x.T  # (N, N) in [0, 2]
    raise ValueError(f"distance must be 'euclidean' or 'cosine'; got {distance!r}")


def _random_choice(mask, generator):
    """For each row of a bool (N, N) mask, one column chosen uniformly among its True entries."""
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)  # (N, N) in [0, 1)
    return torch.where(mask, scores, -1.0).argmax(1)  # (N,), garbage for rows with no True


@torch.no_grad()
def mine_triplets(embeddings, labels, negative_only=None, *, margin=0.5, mining="random",
                  distance="euclidean", generator=None):
    """Pick one (anchor, positive, negative) triplet per anchor from a batch.

    embeddings (N, D), labels (N,), negative_only (N,) bool or None. Returns three (T,) index
    tensors for the T anchors that have a valid triplet. Anchors are samples that are not
    negative-only and have a positive (same label, not negative-only); the candidate negatives of
    an anchor are samples of another label and every negative-only sample.

      random         random positive, random negative
      batch_hard     farthest positive, closest negative (batch-hard, Hermans et al. 2017)
      hard_negative  random positive, closest negative
      semi_hard      random positive; a random negative with d(a,p) < d(a,n) < d(a,p) + margin
                     (semi-hard, Schroff et al. 2015); anchors without one are skipped
      mixed          random positive; the negative closest to that positive
    """
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}; got {mining!r}")
    # per-row labels and flags (the same checks and messages as supcon_loss)
    # (pairs have no own-class rule: every negative-only sample pairs with every anchor)
    z, labels, negative_only, _, _ = _flatten_views(embeddings, labels, negative_only,
                                                    "embeddings", hard_negatives="all")
    if labels is None:
        raise ValueError("triplet mining needs labels")
    if z.dim() != 2 or embeddings.dim() != 2:
        raise ValueError("triplet mining takes (N, D) embeddings")
    N = z.shape[0]
    dist = pairwise_distances(_at_least_fp32(z), distance)  # (N, N), no gradient: for choosing
    eye = torch.eye(N, dtype=torch.bool, device=z.device)  # (N, N) i == j
    real = ~negative_only  # (N,) may be an anchor or a positive
    same = labels[:, None] == labels[None, :]  # (N, N) same label
    positive_mask = same & ~eye & real[None, :] & real[:, None]  # (N, N) candidate positives
    negative_mask = (~same | negative_only[None, :]) & real[:, None]  # (N, N) candidate negatives
    valid = positive_mask.any(1) & negative_mask.any(1)  # (N,) anchors with at least one triplet

    # ---- the positive of each anchor                                                 (N,)
    if mining == "batch_hard":
        pos = torch.where(positive_mask, dist, -math.inf).argmax(1)  # farthest positive
    else:
        pos = _random_choice(positive_mask, generator)  # a uniformly random positive
    # ---- the negative of each anchor                                                 (N,)
    if mining == "random":
        neg = _random_choice(negative_mask, generator)
    elif mining in ("batch_hard", "hard_negative"):
        neg = torch.where(negative_mask, dist, math.inf).argmin(1)  # closest to the anchor
    elif mining == "mixed":
        neg = torch.where(negative_mask, dist[pos], math.inf).argmin(1)  # closest to the positive
    else:  # semi_hard: negatives farther than the positive, but inside the margin
        d_ap = dist.gather(1, pos[:, None])  # (N, 1)
        semi_hard_mask = negative_mask & (dist > d_ap) & (dist < d_ap + margin)  # (N, N)
        neg = _random_choice(semi_hard_mask, generator)
        valid &= semi_hard_mask.any(1)  # no semi-hard negative: the anchor sits this batch out
    anchor = torch.nonzero(valid).squeeze(1)  # (T,) anchors with a triplet
    return anchor, pos[anchor], neg[anchor]  # three (T,) index tensors


def triplet_loss(embeddings, labels, negative_only=None, *, margin=0.5, mining="random",
                 distance="euclidean", generator=None):
    """Triplet margin loss, mean over anchors of max(d(a,p) - d(a,n) + margin, 0).

    Triplets are mined in the batch by `mine_triplets` (one per anchor; negative-only samples are
    candidate negatives only). Embeddings are used as they are (not normalised); distance is
    "euclidean" (with F.pairwise_distance's eps, as F.triplet_margin_loss) or "cosine" (1 - cos).
    Returns 0 with zero gradients when no anchor has a valid triplet.
    """
    a, p, n = mine_triplets(embeddings, labels, negative_only, margin=margin, mining=mining,
                            distance=distance, generator=generator)
    if a.numel() == 0:
        return embeddings.sum() * 0.0
    x = _at_least_fp32(embeddings)
    # index_select: indices repeat, and its backward adds them up in a fixed order (see supcon_loss)
    return triplet_margin(x.index_select(0, a), x.index_select(0, p), x.index_select(0, n),
                          margin=margin, distance=distance)


def triplet_margin(anchor, positive, negative, *, margin=0.5, distance="euclidean"):
    """mean over T given triplets (each (T, D)) of max(d(a,p) - d(a,n) + margin, 0)."""
    if distance == "euclidean":  # the eps of F.pairwise_distance keeps the gradient finite at 0
        d_ap = F.pairwise_distance(anchor, positive)  # (T,) d(a, p)
        d_an = F.pairwise_distance(anchor, negative)  # (T,) d(a, n)
    else:
        d_ap = 1.0 - F.cosine_similarity(anchor, positive)  # (T,)
        d_an = 1.0 - F.cosine_similarity(anchor, negative)  # (T,)
    return F.relu(d_ap - d_an + margin).mean()  # mean of the hinge over the T triplets


# -----------------------------------------------------------------------------
# 3. Cosine-embedding loss on every pair (the Siamese project)


def cosine_pair_loss(embeddings, labels, negative_only=None, *, margin=0.0, balance=False):
    """Cosine embedding loss over every pair (i < j) of the batch.

    same label, neither negative-only:  1 - cos(x_i, x_j)            (y = +1)
    otherwise:                          max(0, cos(x_i, x_j) - margin) (y = -1)
    Pairs of two negative-only samples are skipped (neither is ever an anchor).
    Mean over pairs; balance=True gives the mean of the positive-pair and negative-pair means.
    """
    # (pairs have no own-class rule: every negative-only sample pairs with every anchor)
    z, labels, negative_only, _, _ = _flatten_views(embeddings, labels, negative_only,
                                                    "embeddings", hard_negatives="all")
    if labels is None:
        raise ValueError("cosine_pair_loss needs labels")
    N = z.shape[0]
    x = F.normalize(_at_least_fp32(z), dim=1)  # (N, D) unit rows
    with torch.autocast(x.device.type, enabled=False):  # fp32 even under train.py's autocast
        cos = x @ x.T  # (N, N) cosine similarities
    i, j = torch.triu_indices(N, N, offset=1, device=z.device)  # (2, N(N-1)/2) every pair once
    keep = ~(negative_only[i] & negative_only[j])  # a pair of two negatives teaches nothing
    i, j = i[keep], j[keep]  # (P,) each
    if i.numel() == 0:
        return embeddings.sum() * 0.0
    similar = (labels[i] == labels[j]) & ~negative_only[i] & ~negative_only[j]  # (P,)
    c = cos[i, j]  # (P,)
    per_pair = torch.where(similar, 1.0 - c, F.relu(c - margin))  # (P,) y=+1: 1-cos; y=-1: hinge
    if not balance or similar.all() or not similar.any():  # one kind of pair only: plain mean
        return per_pair.mean()
    return 0.5 * (per_pair[similar].mean() + per_pair[~similar].mean())  # each kind weighs half


# -----------------------------------------------------------------------------
# 4. Encoders and heads


class SmallCNN(nn.Module):
    """The fruit project's CNN: conv3x3(32)-ReLU-pool-conv3x3(64)-ReLU-pool-fc(128)-ReLU-dropout.

    Sized to the input: the flattened size follows from image_size. Outputs 128-d features.
    """

    def __init__(self, in_channels=3, image_size=32, dropout=0.5):
        """in_channels: 1 (grey) or 3 (RGB); image_size: the side in pixels (a multiple of 4)."""
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (32, H/2, W/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (64, H/4, W/4)
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU(), nn.Dropout(dropout),
        )
        self.out_dim = 128

    def forward(self, x):
        """(B, C, H, W) images -> (B, 128) features."""
        return self.features(x)


RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def resnet(name="resnet18", in_channels=3, small_images=True, pretrained=False):
    """A torchvision ResNet without its classifier: (B, C, H, W) -> (B, 512 or 2048).

    small_images: replace the 7x7 stride-2 stem and max-pool by a 3x3 stride-1 conv (the usual
    CIFAR variant), so 32 px images keep a 4x4 final map. pretrained: ImageNet weights from
    torchvision's cache (needs them downloaded beforehand; this raises a clear error otherwise).
    """
    import torchvision  # here, not at the top: the losses need torch alone
    if name not in RESNETS:
        raise ValueError(f"model must be one of {sorted(RESNETS)}; got {name!r}")
    if not pretrained:
        net = torchvision.models.get_model(name, weights=None)
    else:
        try:  # the weights come from torchvision's cache: no network here, perhaps no file
            net = torchvision.models.get_model(
                name, weights=torchvision.models.get_model_weights(name).DEFAULT)
        except Exception as error:  # no network / no cached file
            raise RuntimeError(
                f"--pretrained: could not load torchvision's ImageNet weights for {name} "
                f"({error}). Download them once with network access (they go to $TORCH_HOME), "
                f"or train from scratch without --pretrained.") from error
    if small_images:  # 32 px: a 7x7/2 stem + pool would leave a 1x1 map after layer4
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if pretrained:  # grey input: the sum of the RGB filters sees the same brightness
            net.conv1.weight.data = old.weight.data.sum(1, keepdim=True)
    net.fc = nn.Identity()  # the encoder ends at the pooled features; heads come separately
    net.out_dim = RESNETS[name]  # 512 (ResNet-18/34) or 2048 (ResNet-50)
    return net


def build_encoder(name, in_channels, image_size, pretrained=False):
    """`--model` name -> encoder module with an `out_dim` attribute."""
    if name == "cnn":
        if pretrained:
            raise ValueError("--pretrained is only available for the ResNet models")
        return SmallCNN(in_channels, image_size)
    return resnet(name, in_channels, small_images=image_size <= 64, pretrained=pretrained)


class ProjectionHead(nn.Module):
    """SupCon's MLP projection head: Linear-ReLU-Linear, output L2-normalised (B, out_dim)."""

    def __init__(self, in_dim, out_dim=128):
        """in_dim: the encoder's feature size; out_dim: the embedding size the loss sees."""
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                                 nn.Linear(in_dim, out_dim))

    def forward(self, h):
        """(B, in_dim) features -> (B, out_dim) unit-length embeddings (z in extended Eq. 2)."""
        return F.normalize(self.net(h), dim=1)


class EmbeddingHead(nn.Module):
    """The mushroom project's 3 linear layers (in-512-256-d), for the triplet and cosine losses."""

    def __init__(self, in_dim, out_dim=128):
        """in_dim: the encoder's feature size; out_dim: d (the mushroom project: 16, 64, 128)."""
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(inplace=True),  # (B, 512)
                                 nn.Linear(512, 256), nn.ReLU(inplace=True),  # (B, 256)
                                 nn.Linear(256, out_dim))  # (B, d)

    def forward(self, h):
        """(B, in_dim) features -> (B, out_dim) embeddings, not normalised (p-norm distances)."""
        return self.net(h)


class ContrastiveModel(nn.Module):
    """Encoder + head. forward(x) -> embedding used by the loss; encode(x) -> encoder features
    (what the linear classifier and the evaluation use, as in the SupCon paper).

    Two optional parts, present only where train.py's --negative-mode asks for them (so the
    weights of every other run keep their names): logit_head, a LogitHead on the encoder
    features trained with the encoder ("head"); prototypes, a (K, D) buffer of unit class
    prototypes, state that the optimiser never sees ("prototypes"). Both are in state_dict(),
    so checkpoints and model.pt hold them."""

    def __init__(self, encoder, head, logit_head=None, prototypes=None):
        """encoder: images -> (B, F) features; head: features -> the loss's embeddings;
        logit_head: features -> (B, K) logits, or None; prototypes: (K, D) tensor, or None."""
        super().__init__()
        self.encoder, self.head = encoder, head
        if logit_head is not None:
            self.logit_head = logit_head
        if prototypes is not None:
            self.register_buffer("prototypes", prototypes)

    def encode(self, x):
        """(B, C, H, W) -> (B, F) encoder features (the representation that is evaluated)."""
        return self.encoder(x)

    def forward(self, x, with_logits=False):
        """(B, C, H, W) -> (B, D) embeddings for the contrastive loss; with_logits: and the
        logit head's (B, K) logits, from the same encoder pass (one forward: DDP sees one)."""
        h = self.encoder(x)  # (B, F)
        return (self.head(h), self.logit_head(h)) if with_logits else self.head(h)


class LogitHead(nn.Linear):
    """--negative-mode head's classifier: a linear layer on the encoder features (F -> K logits,
    like the linear probe) trained jointly with the encoder; outlier_loss ("oe" or "energy")
    names its outlier term, and with it the OOD score it is read with (evaluate.head_scores)."""

    def __init__(self, in_dim, num_classes, outlier_loss):
        """in_dim: F; num_classes: K; outlier_loss: one of HEAD_LOSSES."""
        if outlier_loss not in HEAD_LOSSES:
            raise ValueError(f"outlier_loss must be one of {HEAD_LOSSES}; got {outlier_loss!r}")
        super().__init__(in_dim, num_classes)
        self.outlier_loss = outlier_loss


def build_model(model, loss, in_channels, image_size, num_classes, embedding_dim=128,
                pretrained=False, logit_head=None, prototypes=False):
    """Encoder + the head the loss needs, and the linear classifier on the encoder features.

    supcon / simclr: the MLP projection head (normalised); triplet / cosine: the 3-layer embedding
    head; ce: no head (the classifier sits directly on the encoder). logit_head ("oe" or
    "energy"): a LogitHead with that outlier term; prototypes: a (K, D) buffer of zeros, no class
    seen yet (update_prototypes). Both come after the other parts, so the encoder and head start,
    under the same seed, from the same weights with or without them."""
    encoder = build_encoder(model, in_channels, image_size, pretrained)
    if loss in ("supcon", "simclr"):
        head = ProjectionHead(encoder.out_dim, embedding_dim)
    elif loss in ("triplet", "cosine"):
        head = EmbeddingHead(encoder.out_dim, embedding_dim)
    else:
        head = nn.Identity()
    extra = LogitHead(encoder.out_dim, num_classes, logit_head) if logit_head else None
    mu = torch.zeros(num_classes, embedding_dim) if prototypes else None  # (K, D)
    return ContrastiveModel(encoder, head, extra, mu), nn.Linear(encoder.out_dim, num_classes)


class LabelledFirst(nn.Module):
    """model(x) with the negative-only rows kept out of batch norm: forward(x, n_labelled) runs
    the model on the first n_labelled rows (the labelled images' views) exactly as it would
    without negatives, then on the rows after them (negative-only images) with every batch-norm
    layer normalising them by the statistics it just computed on the labelled rows. So
    negative-only images enter neither the labelled images' batch statistics nor the running
    averages, and at --negative-weight 0 a run with them trains the weights of the run without
    them bit for bit: the labelled pass is the same operation on the same tensor, whatever the
    thread count (one pass over all rows would split the convolutions' sums differently), and
    the loss's zero-weight terms send back exact zeros. (Plain batch norm would mix negatives
    into every labelled embedding's normalisation.)

    Two passes in one forward call, so DistributedDataParallel and torch.compile see one forward
    per backward; gradients flow through the borrowed statistics into the labelled rows, as in
    plain batch norm. n_labelled None: one plain pass over every row (ce, dataset-scope
    triplets, --negative-mode classes, whose negatives are labelled anchors). A shard without
    labelled rows (torchrun) has nothing to borrow: running statistics, nothing updated. Under
    --sync-bn the labelled pass gets every rank's labelled statistics (SyncBatchNorm runs on
    every rank, on 0 rows too); the negative-only rows their shard's. Layers in eval mode are
    untouched. The wrapped `model` is what is saved: this module holds no state of its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, n_labelled=None, **kwargs):  # x (N, C, H, W), labelled rows first
        if n_labelled is None or n_labelled >= len(x):
            return self.model(x, **kwargs)
        norms = [m for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        stats = {}  # batch-norm layer -> (mean, biased variance) of the labelled rows, fp32
        first = None
        if n_labelled > 0 or any(isinstance(m, nn.SyncBatchNorm) for m in norms):
            with _batch_norm_forwards(norms, lambda bn, own: _recording(bn, own, stats)):
                first = self.model(x[:n_labelled], **kwargs)  # as without negatives
        with _batch_norm_forwards(norms, lambda bn, own: _borrowing(bn, stats)):
            rest = self.model(x[n_labelled:], **kwargs)
        if first is None:  # a shard of negative-only rows
            return rest
        if isinstance(rest, tuple):  # e.g. (embeddings, logits) under --negative-mode head
            return tuple(torch.cat(pair) for pair in zip(first, rest))
        return torch.cat([first, rest])


@contextlib.contextmanager
def _batch_norm_forwards(norms, make):
    """Within it, each layer's forward is make(layer, its own forward); put back on exit."""
    saved = [vars(bn).get("forward") for bn in norms]  # an instance's own forward, if any
    for bn in norms:
        bn.forward = make(bn, bn.forward)
    try:
        yield
    finally:
        for bn, own in zip(norms, saved):
            if own is None:
                del bn.forward  # the class's forward again
            else:
                bn.forward = own


def _recording(bn, own, stats):
    """The layer's own forward, noting the mean and biased variance of its input per channel
    (what train-mode batch norm normalises with), in fp32 whatever the autocast dtype."""
    def forward(x):  # x (n, C, ...)
        if len(x):
            dims = [0, *range(2, x.dim())]  # every dimension but the channel
            stats[bn] = (x.float().mean(dims), x.float().var(dims, unbiased=False))
        return own(x)
    return forward


def _borrowing(bn, stats):
    """Normalise with the labelled rows' statistics (the running ones where there were none);
    the running averages are not touched."""
    def forward(x):  # x (m, C, ...)
        mean, var = stats.get(bn, (bn.running_mean, bn.running_var))
        if mean is None:  # no running statistics kept either: the rows' own
            return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per-channel values against (m, C, ...)
        # written out: F.batch_norm takes no gradient through its statistics
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:  # gamma * x_hat + beta
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        return y.to(x.dtype)
    return forward


# -----------------------------------------------------------------------------
# 5. Negative-only images outside the denominators (train.py --negative-mode head, prototypes)

HEAD_LOSSES = ("oe", "energy")  # the head's outlier term: outlier exposure, or energy margins


def logit_head_loss(logits, labels, negative_only, *, outlier_loss="oe", outlier_weight=0.5,
                    ce_weight=1.0, margins=(-25.0, -7.0)):
    """The head's terms, ce_weight * CE + outlier_weight * L_out (the notes at the top), from a
    batch's logits: (N, K) rows or (B, V, K) views of B images, labels and negative_only (bool)
    per image or row as supcon_loss takes them. CE: the mean cross-entropy of the labelled rows;
    L_out: "oe", the mean cross-entropy of the negative-only rows to the uniform distribution;
    "energy", the squared hinges on the energies of the labelled rows (margin m_in) and of the
    negative-only rows (m_out), margins = (m_in, m_out). A mean over no row is 0. Half-precision
    logits are computed in fp32."""
    if outlier_loss not in HEAD_LOSSES:
        raise ValueError(f"outlier_loss must be one of {HEAD_LOSSES}; got {outlier_loss!r}")
    f, labels, negative_only, _, _ = _flatten_views(  # the row bookkeeping stays on the labels'
        logits, labels, negative_only, "logits", hard_negatives="all",  # device (no GPU wait)
        device=labels.device if torch.is_tensor(labels) else None)
    if labels is None:
        raise ValueError("logit_head_loss needs labels")
    f = _at_least_fp32(f)  # (N, K)

    def rows(mask):  # the rows of f where mask (N,) holds
        return f.index_select(0, _to_device(torch.nonzero(mask).squeeze(1), f.device))

    def mean(x):  # (n,) -> its mean; 0, with a graph, when n = 0
        return x.mean() if x.numel() else f.sum() * 0.0

    f_in, f_out = rows(~negative_only), rows(negative_only)  # (R, K) labelled, (M, K) negatives
    ce = mean(F.cross_entropy(f_in, _to_device(labels[~negative_only], f.device),
                              reduction="none"))  # (R,) -log softmax_y f(x)
    if outlier_loss == "oe":  # CE(f(x'), U) = -1/K sum_k log softmax_k f(x')
        out = mean(-f_out.log_softmax(1).mean(1))
    else:  # energies E(x) = -log sum_k exp f_k(x) (temperature 1), squared hinges
        m_in, m_out = margins
        e_in, e_out = -torch.logsumexp(f_in, 1), -torch.logsumexp(f_out, 1)  # (R,), (M,)
        out = mean(F.relu(e_in - m_in) ** 2) + mean(F.relu(m_out - e_out) ** 2)
    return ce_weight * ce + outlier_weight * out


def update_prototypes(prototypes, z, labels, momentum=0.95):
    """CIDER's prototype update (Ming et al. 2023), one labelled embedding at a time in row order:
        mu_{y_n} <- Normalize(alpha mu_{y_n} + (1 - alpha) z_n),       alpha = momentum
    exactly that sequence, run for all classes at once: a class's updates never touch another's,
    so step k updates every class with its k-th row, and the loop is as long as one class's rows.
    prototypes (C, D): unit rows, or zero rows for classes not seen yet (their first update gives
    z_n itself); z (N, D) unit rows; labels (N,) in [0, C). Returns the new (C, D) prototypes and
    leaves `prototypes` as it was. The result is a function of z: a loss on it reaches the
    encoder through every update, as in CIDER's code (its dispersion loss has no other path)."""
    labels = torch.as_tensor(labels)
    order = torch.argsort(labels, stable=True)  # (N,) rows by class, each class's in row order
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)  # (G,) each
    first = torch.cumsum(counts, 0) - counts  # (G,) where each class's rows start in `order`
    mu = prototypes.to(z.dtype)  # (C, D)
    for k in range(int(counts.max()) if len(counts) else 0):
        live = counts > k  # (G,) the classes that have a k-th row
        rows = _to_device(order[first[live] + k], z.device)  # (g,) those rows
        cls = _to_device(classes[live], z.device)  # (g,) their classes, each once
        mu = mu.index_copy(0, cls, F.normalize(momentum * mu.index_select(0, cls)
                                              + (1 - momentum) * z.index_select(0, rows), dim=1))
    return mu


def dispersion_loss(prototypes, temperature=0.1):
    """CIDER's L_dis (Ming et al. 2023) over the C' classes that have a prototype (non-zero rows
    of the (C, D) prototypes): 1/C' sum_i log( 1/(C'-1) sum_{j != i} exp(mu_i . mu_j / tau) ).
    0 with fewer than two."""
    with torch.autocast(prototypes.device.type, enabled=False):  # fp32 even under autocast
        s = prototypes @ prototypes.T / temperature  # (C, C) mu_i . mu_j / tau
    seen = prototypes.detach().norm(dim=1) > 0  # (C,)
    eye = torch.eye(len(seen), dtype=torch.bool, device=seen.device)
    pair = seen[:, None] & seen[None, :] & ~eye  # (C, C) j != i, both seen
    others = pair.sum(1)  # (C,) C' - 1 for a seen class, 0 for the others
    has = others > 0  # (C,) the rows of the mean
    # a row without a pair would be all -inf (nan in backward): zeros instead, then left out
    lse = torch.logsumexp(torch.where(has[:, None], s.masked_fill(~pair, -math.inf), 0.0), 1)
    term = lse - others.clamp(min=1).to(s.dtype).log()  # (C,) log of the mean over j
    return torch.where(has, term, 0.0).sum() / has.sum().clamp(min=1)


def prototype_outlier_loss(z_out, prototypes, temperature=0.1):
    """L_out of --negative-mode prototypes: the mean over negative-only embeddings z_n (M, D) of
    log sum_c exp(mu_c . z_n / tau), over the classes that have a prototype ((C, D), zero rows
    left out). Large when z_n is near any prototype; 0 for M = 0."""
    if not len(z_out):
        return z_out.sum() * 0.0
    seen = prototypes.norm(dim=1) > 0  # (C,)
    with torch.autocast(z_out.device.type, enabled=False):
        s = z_out @ prototypes.T / temperature  # (M, C) mu_c . z_n / tau
    return torch.logsumexp(s.masked_fill(~seen[None, :], -math.inf), 1).mean()


def prototype_loss(features, labels, negative_only, prototypes, *, momentum=0.95,
                   temperature=0.1, outlier_weight=1.0):
    """--negative-mode prototypes' terms beside SupCon, L_dis + outlier_weight * L_out (the notes
    at the top), and the updated prototypes. features (N, D) or (B, V, D), labels and
    negative_only as supcon_loss takes them; rows in view-major order (every image's first view,
    then the second views: the order of CIDER's batches). The labelled rows update the (C, D)
    prototypes (update_prototypes); L_dis is taken on the updated prototypes, through their
    gradient; L_out on the negative-only rows against them detached (it moves the negatives,
    not the prototypes). Returns (loss, new prototypes detached): the caller keeps them when the
    step's weights are updated."""
    z, labels, negative_only, _, _ = _flatten_views(
        features, labels, negative_only, hard_negatives="all",
        device=labels.device if torch.is_tensor(labels) else None)
    if labels is None:
        raise ValueError("prototype_loss needs labels")
    z = F.normalize(_at_least_fp32(z), dim=1)  # (N, D) unit rows
    real, negative = (_to_device(torch.nonzero(m).squeeze(1), z.device)
                      for m in (~negative_only, negative_only))  # (R,), (M,) row indices
    mu = update_prototypes(prototypes, z.index_select(0, real), labels[~negative_only], momentum)
    loss = dispersion_loss(mu, temperature)
    if negative.numel():
        loss = loss + outlier_weight * prototype_outlier_loss(z.index_select(0, negative),
                                                              mu.detach(), temperature)
    return loss, mu.detach()


# -----------------------------------------------------------------------------
# Plumbing: the settings checked, tensors moved without a wait, the demonstration


def _at_least_fp32(x):
    """Half-precision tensors are upcast to fp32 for the loss math; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _to_device(x, device):
    """x on `device` without making the host wait. Host -> CUDA copies go from pinned (page-locked)
    memory with non_blocking=True: from ordinary (pageable) memory the driver may first wait for
    the GPU to finish all queued work, a hidden synchronisation in every step. Any other copy
    blocks (a non-blocking copy to the host could be read before it has arrived)."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        # pin_memory() draws from PyTorch's cache of pinned buffers, which keeps each one until
        # its copy is done, so the source cannot be overwritten while it is in flight
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _check_settings(temperature, base_temperature, hard_negatives, negative_weight, chunk_size,
                    fused):
    """Every mistake in supcon_loss's settings is a ValueError that says what was expected."""
    if not torch.is_tensor(hard_negatives) and hard_negatives not in ("same_class", "all"):
        raise ValueError(f"hard_negatives must be 'same_class', 'all' or a bool tensor with one "
                         f"entry per image; got {hard_negatives!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if base_temperature is not None and not base_temperature > 0:
        raise ValueError(f"base_temperature must be None or > 0; got {base_temperature}")
    if not negative_weight >= 0:
        raise ValueError(f"negative_weight must be >= 0; got {negative_weight}")
    automatic = isinstance(chunk_size, str) and chunk_size == "auto"  # the default path
    if not automatic and chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be 'auto', None (the plain path) or a positive int; "
                         f"got {chunk_size!r}")
    if fused not in (False, True) or (fused and not automatic and chunk_size is not None):
        raise ValueError(f"fused must be True or False, and True only without chunk_size (two "
                         f"different paths); got fused={fused!r}, chunk_size={chunk_size!r}")


def _demo(argv=None):
    """`python supcon.py`: every loss of this file on a tiny random batch, printed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The demonstration: 8 images x 2 views, 2 classes, 2 of the images near-OOD.")
    parser.add_argument("--temperature", type=float, default=0.1, help="tau (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random embeddings")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    feats = torch.randn(8, 2, 16)  # (B, V, D)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    near_ood = torch.tensor([False] * 6 + [True] * 2)  # the last two images: negatives only
    tau = dict(temperature=args.temperature)
    print("SupCon, no negatives        :", supcon_loss(feats[:6], labels[:6], **tau).item())
    print("SupCon, near-OOD negatives  :", supcon_loss(feats, labels, near_ood, **tau).item())
    print("  same, chunked (chunk 3)   :",
          supcon_loss(feats, labels, near_ood, chunk_size=3, **tau).item())
    print("SimCLR                      :", supcon_loss(feats[:6], **tau).item())
    print("triplet (semi-hard)         :",
          triplet_loss(feats[:, 0], labels, near_ood, mining="semi_hard").item())
    print("cosine pairs                :", cosine_pair_loss(feats[:, 0], labels, near_ood).item())


if __name__ == "__main__":
    _demo()
