"""
evaluate.py -- classification, out-of-distribution (OOD) detection and few-shot evaluation of a
trained run, with the pictures that explain it; and a meter of how near synthetic images are.

  Classification   accuracy, macro precision / recall / F1, one-vs-rest ROC-AUC, confusion
                   matrix, for the linear head and for a k-NN classifier on the embeddings
                   (k = 20, cosine; with its top-5 hit accuracy: the share of test images
                   whose class is that of one of their 5 nearest training images).
  OOD detection    scores: maximum softmax probability (MSP, Hendrycks & Gimpel 2017); k-NN
                   distance on normalised embeddings (Sun et al. 2022: minus the distance to the
                   k-th nearest training embedding; k = 50 as theirs, and k = 1); Mahalanobis
                   (Lee et al. 2018: class means, one shared covariance, max over classes of
                   minus the squared distance). Metrics: AUROC, AUPR-In, AUPR-Out, FPR at 95%
                   TPR. Convention: in-distribution is the POSITIVE class, a higher score means
                   "more in-distribution".
  k-NN+neg         a run with negative-only images (--negative-data, --negatives) also reports
                   the k-NN score with its negatives as an OOD reference beside the ID one
                   (train.py --negative-mode score, mode (b), uses them there alone):
                       s(x) = -r_k(x; real training images) + r_k'(x; the run's negatives)
                   r_k: the distance to the k-th nearest normalised embedding; k = 50 (the k-NN
                   score's, so the first term IS "k-NN"), k' = the same share of the M negatives
                   as k is of the N references (round(k M / N), 1 to M). It is SSD_k's few-shot
                   score (Sehwag et al. 2021: the Mahalanobis distance to the ID data
                   minus that to a few OOD samples) with Sun et al.'s k-NN distance in place of
                   the Mahalanobis one. Top level: ood_auroc_knn_neg beside ood_auroc_knn, a
                   paired contrast within one run; evaluate.py RUN reads the run's negatives again.
  Head             a run of train.py --negative-mode head is also scored by the head trained with
                   its encoder: "head MSP" (its outlier term oe) or "head energy" (energy: -E(x),
                   the log-sum-exp of its logits, Liu et al. 2020); top level ood_auroc_head and
                   head_test_accuracy, beside the frozen linear probe's ood_auroc_msp and
                   test_accuracy. model.pt holds the head; evaluate.py RUN rebuilds it.
  Reference set    the k-NN scores, the k-NN classifier and the Mahalanobis statistics use the
                   REAL training images only, whatever synthetic images the run trained on, so
                   runs with and without synthetic images are measured against the same set.
                   A k beyond its N images is lowered, said in one line and recorded as
                   metrics.json's knn_k: the vote and top-5 hit to N - 1 (with k = N every
                   query gets the same vote), the OOD scores to N (no k-th neighbour beyond).
  Few-shot         N-way K-shot episodes on the held-out (unseen) classes: nearest-prototype and
                   nearest-neighbour accuracy, mean and 95% confidence interval.
  Nearness         --nearness DIR: for each (kind, strength) of a synthetic set, the share of its
                   images a reference classifier still puts in their source's class, and their
                   OOD AUROC against the real test images, beside the held-out classes' AUROC.
                   With --band-of REAL (a folder of real near-OOD photographs) it is also a
                   filter: it keeps the synthetic near-OOD images whose k-NN score lies in the
                   band REAL's images occupy (their 5% to 95% quantiles), copied into
                   DIR/near_ood_band/, a folder for train.py --negative-data.

Run:  python evaluate.py runs/<name>  [--ood-data PATH]
      python evaluate.py --nearness synthetic/digits [data options that made it] [--run RUN]
      python evaluate.py --nearness synthetic/digits --band-of photos/near_ood   # the filter
"""

import argparse
import collections
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

import data  # ImageSet, devices, atomic files, plots
import supcon  # build_model, to rebuild a run's network

K_NEIGHBOURS = (50, 1)  # the k-NN OOD scores reported; 50 is the headline (Sun et al. 2022)
KNN_NEG = "k-NN+neg"  # the k-NN score with the run's negatives as an OOD reference (knn_neg_score)
# --negative-mode head's score, by its head's outlier term (head_scores); top level: ood_auroc_head
HEAD_SCORES = {"oe": "head MSP", "energy": "head energy"}
KNN_CLASSIFIER_K = 20  # neighbours of the k-NN classifier's vote
TOP_HIT_K = 5  # the top-5 hit accuracy: a query's class among its 5 nearest neighbours' classes
PICTURES = {"t-SNE": "tsne.png", "OOD ROC and PR": "ood_curves.png",  # a report's pictures
            "classification ROC and PR": "classification_curves.png",
            "confusion matrix": "confusion.png", "Grad-CAM": "grad_cam.png"}


# -----------------------------------------------------------------------------
# The whole evaluation
def evaluate(model, classifier, splits, mean, std, device, run_dir=None, synthetic=None,
             external_ood=None, episodes=200, pictures=True, seed=0, negatives=None):
    """Every metric (and, with run_dir and pictures, every picture and report.md) of a model.
    The reference set of the k-NN and Mahalanobis scores is splits.train, the real training
    images; synthetic: the run's synthetic ImageSet (t-SNE only); external_ood: OOD images;
    negatives: the run's negative-only ImageSet, the OOD reference of k-NN+neg (None: none)."""
    mean, std = mean.to(device), std.to(device)
    feats = lambda images: extract_features(model, images, mean, std, device)  # noqa: E731
    logits_of = lambda f: classifier(f.to(device)).float().cpu()  # noqa: E731
    train_f, test_f = feats(splits.train.images), feats(splits.test.images)  # (N, F) each
    neg_f = feats(negatives.images) if negatives is not None and len(negatives) else None  # (M, F)
    with torch.no_grad():
        test_logits = logits_of(test_f)  # (N_test, K)
    train_labels, K = splits.train.labels, len(splits.classes)
    linear = classification_metrics(splits.test.labels, test_logits.softmax(1))  # the linear head
    knn, knn_k_used, knn_note = knn_classification(train_f, train_labels, test_f,  # k lowered
                                                   splits.test.labels, K)  # on a small set
    # the headline numbers first; everything else nested (metrics.json is read by people)
    out = {"test_accuracy": linear["accuracy"], "knn_accuracy": knn["accuracy"],
           "knn_top5_hit": knn["top5_hit"],
           "classification": {"linear": linear, "knn": knn}, "ood": {},
           "ood_convention": "in-distribution is the positive class; higher score = more ID",
           "reference_set": f"the {len(splits.train)} real training images", "knn_k": knn_k_used,
           **({"knn_k_lowered": knn_note} if knn_note else {})}
    ood_sets = {}  # name -> ImageSet of OOD test images
    held_name = f"held-out classes {','.join(splits.ood_classes)}"
    if splits.ood_test is not None:
        ood_sets[held_name] = splits.ood_test
    if external_ood is not None:  # --ood-data
        ood_sets["external"] = external_ood
    curves, ood_feats = {}, {}  # for the pictures and the few-shot episodes
    in_scores = ood_scores(train_f, train_labels, test_f, test_logits, neg_f)  # {score: (N_test,)}
    in_scores.update(head_scores(model, test_f))  # (c): the head trained with the encoder
    out.update(head_accuracy(model, test_f, splits.test.labels))  # and its accuracy
    if neg_f is not None:  # the k of either term, and how many negatives
        out["knn_neg"] = knn_neg_settings(len(train_f), len(neg_f))
    for name, images in ood_sets.items():
        f = feats(images.images)  # (N_ood, F)
        ood_feats[name] = (f, images.labels)  # kept for few-shot and t-SNE
        with torch.no_grad():
            out_scores = ood_scores(train_f, train_labels, f, logits_of(f), neg_f)
            out_scores.update(head_scores(model, f))
        out["ood"][name] = {s: ood_metrics(in_scores[s], out_scores[s]) for s in in_scores}
        curves[name] = {s: (in_scores[s].numpy(), out_scores[s].numpy()) for s in in_scores}
    if splits.ood_test is not None:  # the thesis's OOD numbers, at the top level too
        held = out["ood"][held_name]
        out.update(ood_auroc_knn=held["k-NN"]["auroc"], ood_auroc_knn1=held["k-NN (k=1)"]["auroc"],
                   ood_auroc_msp=held["MSP"]["auroc"], ood_fpr95_knn=held["k-NN"]["fpr95"])
        if KNN_NEG in held:  # the negatives' arm beside the k-NN control, from one run
            out["ood_auroc_knn_neg"] = held[KNN_NEG]["auroc"]
        for score in held.keys() & set(HEAD_SCORES.values()):  # (c): its arm's headline
            out["ood_auroc_head"] = held[score]["auroc"]
        f, labels = ood_feats[held_name]  # few-shot on the unseen classes
        out["few_shot"] = {f"{n}-shot": few_shot_accuracy(f, labels, n, episodes, seed)
                           for n in (1, 5)}  # 1-shot and 5-shot, the usual pair
    if run_dir is None or not pictures:
        return out
    groups = {"test (ID)": (test_f, splits.test.labels),
              "training (real)": (train_f, train_labels)}
    if synthetic is not None and len(synthetic):
        syn_f = feats(synthetic.images)  # where the synthetic images land
        for kind, name in ((data.KIND_ID, "synthetic ID"),
                           (data.KIND_NEAR_OOD, "synthetic near-OOD")):
            this = synthetic.kind == kind
            if this.any():
                groups[name] = (syn_f[this], synthetic.labels[this])
    for name, (f, _) in ood_feats.items():
        groups[f"OOD test: {name}"] = (f, None)  # no class colours: never trained
    write_report(out, pictures_of(model, classifier, splits, mean, std, device, run_dir, groups,
                                  curves, test_logits, linear, seed), run_dir)
    return out


def pictures_of(model, classifier, splits, mean, std, device, run_dir, groups, curves,
                test_logits, linear, seed):
    """Every picture of the report, in report order: {title: file name}."""
    at = lambda title: os.path.join(run_dir, PICTURES[title])  # noqa: E731
    files = {"t-SNE": plot_tsne(groups, splits.classes, at("t-SNE"), seed)}
    if curves:  # no OOD set: no OOD curves
        files["OOD ROC and PR"] = plot_ood_curves(curves, at("OOD ROC and PR"))
    files["classification ROC and PR"] = plot_classification_curves(
        splits.test.labels.numpy(), test_logits.softmax(1).numpy(), splits.classes,
        at("classification ROC and PR"))
    files["confusion matrix"] = plot_confusion(linear["confusion"], splits.classes,
                                               at("confusion matrix"),
                                               "Confusion matrix of the linear head (test set)")
    files["Grad-CAM"] = plot_grad_cam(model, classifier, splits.test, splits.classes, mean, std,
                                      device, at("Grad-CAM"))
    return files


def write_report(metrics, files, run_dir):
    """report.md: the numbers as tables, then the pictures."""
    lines = ["# Evaluation report", "", f"Run folder: `{run_dir}`", "",
             "## Classification (test set)", "",
             "| classifier | accuracy | top-5 hit | precision | recall | F1 | ROC-AUC (OvR) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in metrics["classification"].items():
        hit = f"{m['top5_hit']:.4f}" if "top5_hit" in m else "-"  # k-NN only
        lines.append(f"| {name} | {m['accuracy']:.4f} | {hit} | {m['precision']:.4f} | "
                     f"{m['recall']:.4f} | {m['f1']:.4f} | {m['roc_auc']:.4f} |")
    lines += ["", knn_report_line(metrics)]
    if metrics["ood"]:
        lines += ["", "## OOD detection", "",
                  f"Convention: {metrics['ood_convention']}. Reference set of the k-NN and "
                  f"Mahalanobis scores: {metrics['reference_set']}. FPR@95: share of OOD images "
                  f"accepted at the threshold that keeps 95% of ID test images.", "",
                  *([f"{KNN_NEG}: {metrics['knn_neg']['score']}, k = {metrics['knn_neg']['k']}, "
                     f"k' = {metrics['knn_neg']['k_negatives']} of the "
                     f"{metrics['knn_neg']['negatives']} negatives.", ""]
                    if metrics.get("knn_neg") else []),
                  "| OOD set | score | AUROC | AUPR-In | AUPR-Out | FPR@95 |",
                  "|---|---|---|---|---|---|"]
        for set_name, scores in metrics["ood"].items():
            for score, m in scores.items():
                lines.append(f"| {set_name} | {score} | {m['auroc']:.4f} | {m['aupr_in']:.4f} | "
                             f"{m['aupr_out']:.4f} | {m['fpr95']:.4f} |")
    if metrics.get("few_shot"):
        lines += ["", "## Few-shot on the held-out classes", "",
                  "| episodes | ways | nearest prototype | nearest neighbour |",
                  "|---|---|---|---|"]
        for name, m in metrics["few_shot"].items():
            if m:  # None: too few held-out classes
                p, n = m["prototype"], m["nearest_neighbour"]
                lines.append(f"| {name}, {m['episodes']} | {m['ways']} | {p['mean']:.4f} ± "
                             f"{p['ci95']:.4f} | {n['mean']:.4f} ± {n['ci95']:.4f} |")
        lines += ["", "(mean ± 95% confidence interval over episodes)"]
    lines += ["", "## Pictures", ""]
    for title, name in files.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]  # path relative to report.md
    data.write_text(os.path.join(run_dir, "report.md"), "\n".join(lines) + "\n")


def knn_report_line(metrics):
    """report.md's sentence on the k-NN classifier, the top-5 hit and the k each k-NN use had."""
    k = metrics["knn_k"]
    ood = ", ".join(f"{name} k = {v}" for name, v in k["ood"].items())
    line = (f"k-NN: cosine similarity to {metrics['reference_set']}; the classifier votes among "
            f"the k = {k['classifier']} nearest; top-5 hit: the share of test images whose class "
            f"is that of one of their k = {k['top5_hit']} nearest; OOD scores: {ood}.")
    if metrics.get("knn_k_lowered"):  # the reference set is smaller than some k
        line += f" Lowered: {metrics['knn_k_lowered']}."
    return line


def load_ood_folder(path, channels, size, resize):
    """Every image under `path` (any layout; hidden files left out) as an OOD ImageSet."""
    if not os.path.isdir(path):
        raise data.DataError(f"--ood-data {path}: no such folder")
    other = collections.Counter()
    files = data.image_files(path, other)  # any layout
    data.say_left_out(path, other)
    if not files:
        raise data.DataError(f"--ood-data {path}: no images found "
                             f"({', '.join(data.IMAGE_EXTENSIONS)})")
    images = []
    for f in files:
        try:
            images.append(data.open_image(f, channels, size, resize))  # the run's channels, size
        except data.DataError as error:
            raise data.DataError(f"--ood-data: {error}. Replace or delete that file.") from error
    return data.ImageSet(torch.stack(images), torch.zeros(len(files), dtype=torch.long), ["ood"],
                         names=files)  # one class "ood", labels all 0


# -----------------------------------------------------------------------------
# Features
@torch.no_grad()
def extract_features(model, images, mean, std, device, batch_size=512, head=False):
    """(N, F) encoder features of uint8 images (N, C, H, W), no augmentation, in eval mode;
    head=True: the loss's embeddings (N, D) instead (what dataset-scope triplet mining sees)."""
    was_training = model.training  # restored at the end: callers may be mid-training
    model.eval()  # batch-norm running statistics, no dropout
    out = []
    for start in range(0, len(images), batch_size):  # batches of 512: bounded memory for any N
        x = data.to_float(images[start:start + batch_size].to(device), mean.to(device),
                          std.to(device))
        out.append((model(x) if head else model.encode(x)).float().cpu())  # (b, F) or (b, D)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)  # zeros(0): no images, no batches


# -----------------------------------------------------------------------------
# OOD scores: higher = more in-distribution
def knn_score(train_features, test_features, k=50, batch_size=2048):
    """Sun et al. 2022: minus the distance from each normalised test embedding to its k-th
    nearest normalised training embedding; k at most N_train (knn_k). (N_test,)"""
    train = F.normalize(train_features.float(), dim=1)  # (N_train, F) unit rows
    k = knn_k(k, len(train), "ood")  # a small training set has no 50th neighbour: N at most
    scores = []  # a (b, N_train) distance matrix at a time bounds the memory
    for start in range(0, len(test_features), batch_size):
        test = F.normalize(test_features[start:start + batch_size].float(), dim=1)  # (b, F)
        distances = torch.cdist(test, train)  # (b, N_train)
        scores.append(-distances.topk(k, dim=1, largest=False).values[:, -1])  # (b,)
    return torch.cat(scores)  # (N_test,) minus the k-th distance


def negatives_k(k, n_reference, n_negatives):
    """k' of k-NN+neg's negatives term: the same share of the M negatives as the ID term's k
    (at most N, as knn_score has it) is of the N references, rounded half up, 1 to M. A k-NN
    density estimate is p(x) ~ k / (N r_k(x)^d), so at equal shares k/N = k'/M the two radii
    measure the two sets at the same share of their mass; a few negatives give k' = 1."""
    k = knn_k(k, n_reference, "ood")  # the ID term's k, as knn_score lowers it
    return min(n_negatives, max(1, math.floor(k * n_negatives / n_reference + 0.5)))


def knn_neg_score(train_features, negative_features, test_features, k=50):
    """k-NN+neg: the k-NN score (Sun et al. 2022) with the negatives as an OOD reference, after
    SSD_k's few-shot score (Sehwag et al. 2021; a difference of distances):
    s(x) = -r_k(x; train) + r_k'(x; negatives), r_k the distance to the k-th nearest normalised
    embedding, k' = negatives_k. Higher = more ID: far from the negatives, near the ID set."""
    k_neg = negatives_k(k, len(train_features), len(negative_features))
    # knn_score is -r_k: -r_k(x; train) - (-r_k'(x; negatives))
    return knn_score(train_features, test_features, k) - \
        knn_score(negative_features, test_features, k_neg)  # (N_test,)


def knn_neg_settings(n_reference, n_negatives):
    """metrics.json's record of k-NN+neg: the score, its two terms' k and the negatives' count."""
    k = K_NEIGHBOURS[0]  # the headline k-NN score's
    return {"score": "-r_k(x; real training images) + r_k'(x; the run's negatives)",
            "k": knn_k(k, n_reference, "ood"),
            "k_negatives": negatives_k(k, n_reference, n_negatives), "negatives": n_negatives}


def msp_score(logits):
    """Maximum softmax probability of the linear head. (N,)"""
    return logits.float().softmax(1).max(1).values  # fp32: half-precision logits would round


def head_logits(model, features):
    """(N, K) logits of train.py --negative-mode head's head (supcon.LogitHead, trained with the
    encoder) on encoder features (N, F), on the CPU; None for a model without that head."""
    head = getattr(model, "logit_head", None)
    if head is None:
        return None
    with torch.no_grad():
        return head(features.to(head.weight.device)).float().cpu()


def head_scores(model, features):
    """--negative-mode head's OOD score, from its head, by the head's outlier term: its MSP
    (outlier exposure, Hendrycks et al. 2019), or minus its energy, -E(x) = log sum_k exp
    f_k(x) (Liu et al. 2020, temperature 1). {name: (N,)}; {} for a model without that head."""
    logits = head_logits(model, features)
    if logits is None:
        return {}
    kind = model.logit_head.outlier_loss
    return {HEAD_SCORES[kind]: msp_score(logits) if kind == "oe" else torch.logsumexp(logits, 1)}


def head_accuracy(model, test_features, test_labels):
    """{"head_test_accuracy": the test accuracy of --negative-mode head's head}; {} without it."""
    logits = head_logits(model, test_features)  # (N_test, K) or None
    if logits is None:
        return {}
    return {"head_test_accuracy": float((logits.argmax(1) == test_labels).float().mean())}


def mahalanobis_score(train_features, train_labels, test_features):
    """Max over classes of minus the squared Mahalanobis distance to the class mean, with one
    covariance shared by all classes (estimated on normalised training embeddings). (N_test,)"""
    train = F.normalize(train_features.double(), dim=1)  # float64 for the inverse below
    test = F.normalize(test_features.double(), dim=1)
    classes = torch.unique(train_labels)  # (K,) sorted class ids present in training
    means = torch.stack([train[train_labels == c].mean(0) for c in classes])  # (K, F)
    centred = train - means[torch.searchsorted(classes, train_labels)]  # x - mu_{y(x)}
    precision = torch.linalg.pinv(centred.T @ centred / len(train), hermitian=True)  # (F, F)
    diff = test[:, None, :] - means[None]  # (N, K, F)
    d2 = torch.einsum("nkf,fg,nkg->nk", diff, precision, diff)  # (x - mu)^T Sigma^-1 (x - mu)
    return (-d2.min(1).values).float()  # max_k -d2 = -min_k d2


def ood_scores(train_f, train_labels, features, logits, negative_f=None):
    """Every OOD score of some images, from their features and logits: {name: (N,)};
    negative_f (M, F): the run's negatives' features, which add k-NN+neg."""
    scores = {"MSP": msp_score(logits)}  # the linear head's confidence
    for k in K_NEIGHBOURS:
        scores[knn_name(k)] = knn_score(train_f, features, k)  # k at most N (knn_settings)
    scores["Mahalanobis"] = mahalanobis_score(train_f, train_labels, features)  # Lee et al. 2018
    if negative_f is not None:  # the headline k-NN score's k, and the negatives' term
        scores[KNN_NEG] = knn_neg_score(train_f, negative_f, features, K_NEIGHBOURS[0])
    return scores


# -----------------------------------------------------------------------------
# Metrics
def ood_metrics(score_in, score_out):
    """AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR, in-distribution = positive class.

    FPR@95: the share of OOD samples scored at or above the threshold that keeps 95% of the
    in-distribution samples (lower is better). AUPR-Out treats OOD as positive, scores negated.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    s_in = np.asarray(score_in, dtype=np.float64)  # tensors or arrays alike
    s_out = np.asarray(score_out, dtype=np.float64)
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]  # in-distribution is the positive class
    s = np.r_[s_in, s_out]  # the scores of both, in y's order
    threshold = np.sort(s_in)[int(math.floor(0.05 * len(s_in)))]  # 95% of ID at or above it
    return {"auroc": float(roc_auc_score(y, s)), "aupr_in": float(average_precision_score(y, s)),
            "aupr_out": float(average_precision_score(1 - y, -s)),
            "fpr95": float(np.mean(s_out >= threshold))}  # OOD at/above it: accepted as ID


def classification_metrics(y_true, probabilities):
    """Accuracy, macro precision / recall / F1, one-vs-rest ROC-AUC and the confusion matrix."""
    from sklearn.metrics import (accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support, roc_auc_score)
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)  # (N, K)
    probabilities = probabilities / probabilities.sum(1, keepdims=True)  # sklearn's OvR needs it
    y_pred = probabilities.argmax(1)  # (N,) the most probable class
    K = probabilities.shape[1]  # classes, even those absent from y_true
    # macro: the unweighted mean over classes; a class never predicted counts precision 0
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(K),
                                                  average="macro", zero_division=0)
    try:
        auc = float(roc_auc_score(y_true, probabilities, multi_class="ovr", labels=range(K))) \
            if K > 2 else float(roc_auc_score(y_true, probabilities[:, 1]))  # binary: P(class 1)
    except ValueError:  # a class missing from y_true: one-vs-rest AUC is undefined
        auc = float("nan")
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p),
            "recall": float(r), "f1": float(f1), "roc_auc": auc,
            # rows: true class, columns: predicted class
            "confusion": confusion_matrix(y_true, y_pred, labels=range(K)).tolist()}


def knn_probabilities(train_features, train_labels, test_features, num_classes,
                      k=KNN_CLASSIFIER_K):
    """k-NN classifier on normalised embeddings (cosine similarity): the class shares among the
    k nearest training embeddings, as (N_test, K) probabilities; k at most N_train - 1
    (knn_k). A tie goes to the lowest class id (the argmax of classification_metrics)."""
    train = F.normalize(train_features.float(), dim=1)  # unit rows: a dot product is a cosine
    test = F.normalize(test_features.float(), dim=1)
    k = knn_k(k, len(train), "classifier")
    neighbours = (test @ train.T).topk(k, dim=1).indices  # (N, k)
    return F.one_hot(train_labels[neighbours], num_classes).float().mean(1)  # (N, K)


def knn_top_hit(train_features, train_labels, test_features, test_labels, k=TOP_HIT_K):
    """The top-k hit accuracy (the mushroom project's "top-5"): the share of test embeddings
    whose class is the class of at least one of their k nearest training embeddings (cosine
    similarity); k at most N_train - 1 (knn_k)."""
    train = F.normalize(train_features.float(), dim=1)  # unit rows: a dot product is a cosine
    test = F.normalize(test_features.float(), dim=1)
    neighbours = (test @ train.T).topk(knn_k(k, len(train), "classifier"), dim=1).indices
    hit = (train_labels[neighbours] == test_labels[:, None]).any(1)  # (N_test,) any of the k
    return float(hit.float().mean())


def knn_k(k, n_reference, use):
    """The k a k-NN use can have with n_reference reference images. "classifier" (the vote and
    the top-k hit): at most N - 1, as with k = N every query counts every reference once -- the
    same vote for all (the majority class), a hit for all whose class is in the set. "ood" (Sun
    et al. 2022: minus the distance to the k-th neighbour): at most N, the farthest one; a k-th
    neighbour beyond N does not exist. A set too small for any k is refused."""
    most = n_reference - 1 if use == "classifier" else n_reference
    if most < 1:
        raise data.DataError(f"k-NN: the reference set (the real training images) has "
                             f"{n_reference} image(s); the k-NN {use} needs at least "
                             f"{2 if use == 'classifier' else 1}. Give the run more training "
                             f"images")
    return min(k, most)


def knn_name(k):
    """The name of the k-NN OOD score with k neighbours in metrics.json and report.md."""
    return "k-NN" if k == 50 else f"k-NN (k={k})"  # 50: the headline, as Sun et al.'s


def knn_settings(n_reference):
    """The k every k-NN use has on n_reference reference images, as metrics.json records them
    ({"classifier", "top5_hit", "ood": {score name: k}}), and one line saying which k were
    lowered and why (None when none was)."""
    asked = {"classifier": KNN_CLASSIFIER_K, "top5_hit": TOP_HIT_K,
             "ood": {knn_name(k): k for k in K_NEIGHBOURS}}
    used = {"classifier": knn_k(KNN_CLASSIFIER_K, n_reference, "classifier"),
            "top5_hit": knn_k(TOP_HIT_K, n_reference, "classifier"),
            "ood": {knn_name(k): knn_k(k, n_reference, "ood") for k in K_NEIGHBOURS}}
    why = {"classifier": "k = N would give every query the same vote",
           "top5_hit": "k = N would make every query a hit", "ood": "no k-th neighbour beyond N"}
    lowered = [f"{use} k {asked[use]} -> {used[use]} ({why[use]})"
               for use in ("classifier", "top5_hit") if used[use] != asked[use]]
    lowered += [f"OOD score {name} k {asked['ood'][name]} -> {k} ({why['ood']})"
                for name, k in used["ood"].items() if k != asked["ood"][name]]
    note = (f"k-NN: the reference set has {n_reference} images; " + "; ".join(lowered)
            if lowered else None)
    return used, note


def knn_classification(train_f, train_labels, test_f, test_labels, num_classes):
    """The k-NN classifier's test metrics with its top-5 hit accuracy ("top5_hit"), the k of
    every k-NN use (knn_settings) and the line saying which were lowered, printed here."""
    used, note = knn_settings(len(train_f))
    if note:
        print(note)
    knn = classification_metrics(test_labels, knn_probabilities(
        train_f, train_labels, test_f, num_classes, KNN_CLASSIFIER_K))
    knn["top5_hit"] = knn_top_hit(train_f, train_labels, test_f, test_labels, TOP_HIT_K)
    return knn, used, note


# -----------------------------------------------------------------------------
# Few-shot on unseen classes (the metric-learning project)
def few_shot_episodes(labels, n_shot, episodes=200, n_query=15, seed=0):
    """N-way K-shot episodes over every class in `labels` (N = number of classes): for each
    episode and class, n_shot support and up to n_query query indices, disjoint, drawn without
    replacement. Classes with fewer than n_shot + 1 images are left out. Returns
    [(support, support_labels, query, query_labels)] as index / label tensors."""
    g = torch.Generator().manual_seed(seed)  # seeded: the same episodes for every run compared
    # n_shot + 1 images at least: one left over as a query
    classes = [c for c in torch.unique(labels).tolist() if (labels == c).sum() > n_shot]
    if len(classes) < 2:  # one way is no task
        return []
    out = []
    for _ in range(episodes):
        support, s_lab, query, q_lab = [], [], [], []
        for way, c in enumerate(classes):
            idx = torch.nonzero(labels == c).squeeze(1)  # class c's images
            idx = idx[torch.randperm(len(idx), generator=g)]  # support, query: disjoint slices
            support.append(idx[:n_shot])  # the first n_shot: the support
            query.append(idx[n_shot:n_shot + n_query])  # the next n_query: the queries
            s_lab += [way] * n_shot  # labels are the ways 0..N-1, not the class ids
            q_lab += [way] * len(query[-1])  # fewer than n_query if the class is small
        out.append((torch.cat(support), torch.tensor(s_lab), torch.cat(query), torch.tensor(q_lab)))
    return out


def few_shot_accuracy(features, labels, n_shot, episodes=200, seed=0):
    """Nearest-prototype (class mean of the normalised support embeddings) and nearest-neighbour
    accuracy over episodes, cosine similarity; mean and 95% interval (1.96 sd / sqrt n)."""
    z = F.normalize(features.float(), dim=1)  # unit rows: a dot product is a cosine
    runs = few_shot_episodes(labels, n_shot, episodes, seed=seed)
    if not runs:  # fewer than two classes with n_shot + 1 images
        return None
    proto_acc, nn_acc = [], []  # one accuracy per episode, each
    for support, s_lab, query, q_lab in runs:
        ways = int(s_lab.max()) + 1  # N of the N-way task
        prototypes = F.normalize(torch.stack([z[support][s_lab == w].mean(0)
                                              for w in range(ways)]), dim=1)  # (ways, F)
        proto_acc.append(((z[query] @ prototypes.T).argmax(1) == q_lab).float().mean().item())
        nn_acc.append((s_lab[(z[query] @ z[support].T).argmax(1)] == q_lab).float().mean().item())

    def summary(values):
        values = np.asarray(values)
        return {"mean": float(values.mean()),
                # 1.96: the standard normal's 97.5% quantile (a two-sided 95% interval)
                "ci95": float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))}
    return {"ways": ways, "episodes": len(runs), "prototype": summary(proto_acc),
            "nearest_neighbour": summary(nn_acc)}


# -----------------------------------------------------------------------------
# The nearness meter: are the "near-OOD" images near, and OOD?
def fit_reference(train_set, mean, std, device, epochs=30, seed=0):
    """The meter's reference classifier when no run is given: the fruit project's small CNN
    trained end to end with cross-entropy on the real training images (Adam 1e-3, batch 64,
    the project's rotation / SimCLR views). Returns (model, classifier)."""
    torch.manual_seed(seed)  # the CNN's initial weights
    _, C, H, _ = train_set.images.shape
    model, classifier = supcon.build_model("cnn", "ce", C, H, len(train_set.classes))  # ce: no head
    model, classifier = model.to(device).train(), classifier.to(device)
    opt = torch.optim.Adam([*model.parameters(), *classifier.parameters()], lr=1e-3)
    g, augment = torch.Generator().manual_seed(seed), "rotation" if C == 1 else "simclr"
    images, labels = train_set.images.to(device), train_set.labels.to(device)  # all on the device
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).to(device).split(64):
            views = data.augment(images[idx], augment, g, mean.to(device), std.to(device))
            loss = F.cross_entropy(classifier(model.encode(views)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), classifier.eval()  # eval mode for the meter


def nearness_rows(train_f, test_scores_of, groups):
    """The meter's table from features. train_f: (N, F) real training features (the k-NN
    reference); test_scores_of(f, logits) -> {"k-NN", "MSP"} scores; groups: [(kind, strength,
    features, logits, source labels)]. For each group: the share classified as its source
    class, and the OOD AUROC against the ID test images (ID positive; k-NN score, k = 50)."""
    id_scores = test_scores_of(None, None)  # None: the ID test images' own scores
    rows = []
    for kind, strength, f, logits, labels in groups:
        scores = test_scores_of(f, logits)
        row = {"kind": kind, "strength": strength, "images": len(f)}
        if labels is not None:  # held-out classes have no source class
            row["source_accuracy"] = float((logits.argmax(1) == labels).float().mean())
        row["ood_auroc"] = ood_metrics(id_scores["k-NN"], scores["k-NN"])["auroc"]
        row["ood_auroc_msp"] = ood_metrics(id_scores["MSP"], scores["MSP"])["auroc"]
        rows.append(row)
    return rows


BAND = (0.05, 0.95)  # the band: the central 90% of the real near-OOD images' k-NN scores


def band_mask(real_scores, scores, quantiles=BAND):
    """(low, high, keep): the band of the real near-OOD images' k-NN scores (real_scores (M,),
    their quantiles, linear interpolation) and which of `scores` (N,) lie in it, ends included."""
    q = torch.tensor(quantiles, dtype=torch.float64)
    low, high = torch.quantile(real_scores.double(), q).tolist()
    return low, high, (scores.double() >= low) & (scores.double() <= high)


def write_band(folder, names):
    """Copy the kept synthetic files (`names`: their paths) into folder/near_ood_band/, flat (a
    negative of every anchor, as --negative-data reads it), replacing an older band folder whole;
    each copy is named by its path inside the set, so no two collide."""
    def fill(tmp):
        os.makedirs(tmp)
        for name in names:
            rel = os.path.relpath(name, folder).replace(os.sep, "__")  # e.g. near_ood__0.9__...
            shutil.copyfile(name, os.path.join(tmp, rel))
    out = os.path.join(folder, "near_ood_band")
    data.atomic_write(out, fill)
    return out


def nearness_band(folder, band_of, syn, splits, train_f, feats, resize):
    """The filter of --band-of: the band of the real near-OOD images' k-NN scores (k = 50, the
    meter's reference encoder and images), the synthetic near-OOD images inside it, copied by
    write_band. A dict for nearness.json. When none is kept, nothing is written and an older
    band folder is removed, so that no folder outlives the band it no longer matches."""
    try:  # read as train.py reads such a folder; its refusals name --band-of, not --negative-data
        real = data.read_negative_data(band_of, splits, resize)
    except data.DataError as error:
        raise data.DataError(str(error).replace("--negative-data", "--band-of", 1)) from error
    near = syn.subset(syn.kind == data.KIND_NEAR_OOD)
    if not len(near):
        raise data.DataError(f"--band-of: {folder} holds no near-OOD images to filter")
    low, high, keep = band_mask(knn_score(train_f, feats(real.images), 50),
                                knn_score(train_f, feats(near.images), 50))
    kept = [name for name, k in zip(near.names, keep.tolist()) if k]
    by_strength = {f"{s:g}": [int(keep[near.strength == s].sum()), int((near.strength == s).sum())]
                   for s in torch.unique(near.strength).tolist()}  # strength: [kept, of]
    if not kept and os.path.isdir(os.path.join(folder, "near_ood_band")):
        shutil.rmtree(os.path.join(folder, "near_ood_band"))  # an older band's: now untrue
    return {"reference": os.path.abspath(band_of), "reference_images": len(real),
            "quantiles": list(BAND), "low": low, "high": high, "kept": len(kept),
            "near_ood_images": len(near), "kept_by_strength": by_strength,
            "folder": os.path.abspath(write_band(folder, kept)) if kept else None}


def nearness(folder, args, run=None, overrides=None, device="auto", epochs=30, band_of=None):
    """evaluate.py --nearness DIR: the meter on DIR's synthetic set; writes DIR/nearness.json.
    The reference is run RUN's encoder and head (its data settings, but for `overrides`), or a
    small CNN fitted here to the real training images of the data options in `args`. band_of:
    also the filter (nearness_band)."""
    dev = data.pick_device(device)
    if run:
        args, splits, model, classifier, mean, std = load_run(run, dev, overrides)
        reference = f"run {run}"
    else:
        splits = data.splits_from_args(args)
        mean, std = data.channel_stats(splits.train.images)  # the real training images' statistics
        model, classifier = fit_reference(splits.train, mean, std, dev, epochs, args.seed)
        reference = (f"small CNN trained with cross-entropy on the {len(splits.train)} real "
                     f"training images, {epochs} epochs")
    _, C, H, _ = splits.train.images.shape
    try:
        syn = data.read_manifest(folder, splits, H, C, args.resize)  # at the real images' size
    except data.LeakError as error:  # a set made for another split, seed or data
        raise data.DataError(f"--nearness {folder}: it was made with other data options than "
                             f"these ({str(error).split('(')[1].split(')')[0]}); give "
                             f"--nearness the data options that made it") from error
    feats = lambda images: extract_features(model, images, mean, std, dev)  # noqa: E731
    logits_of = lambda f: classifier(f.to(dev)).float().cpu()  # noqa: E731
    with torch.no_grad():
        train_f, test_f = feats(splits.train.images), feats(splits.test.images)  # (N, F) each
        test_logits = logits_of(test_f)  # (N_test, K)
        scores = lambda f, logits: {  # noqa: E731
            "k-NN": knn_score(train_f, test_f if f is None else f, 50),  # None: the ID test set
            "MSP": msp_score(test_logits if logits is None else logits)}
        groups = []  # (kind, strength, features, logits, labels)
        for kind in (data.KIND_ID, data.KIND_NEAR_OOD):
            for s in torch.unique(syn.strength[syn.kind == kind]).tolist():  # exact values
                part = syn.subset((syn.kind == kind) & (syn.strength == s))  # one kind + strength
                f = feats(part.images)
                groups.append(("id" if kind == data.KIND_ID else "near_ood", round(s, 6), f,
                               logits_of(f), part.labels))  # labels: each source's class
        if splits.ood_test is not None:
            f = feats(splits.ood_test.images)
            groups.append(("held_out", None, f, logits_of(f), None))  # the real OOD, for scale
        band = nearness_band(folder, band_of, syn, splits, train_f, feats, args.resize) \
            if band_of else None  # the filter: before nearness.json says what it wrote
    rows = nearness_rows(train_f, scores, groups)
    result = {"reference": reference, "id_test_images": len(splits.test),
              "test_accuracy": float((test_logits.argmax(1) == splits.test.labels).float().mean()),
              "rows": [r for r in rows if r["kind"] != "held_out"],  # held_out: reported apart
              "knn_k": knn_k(50, len(train_f), "ood")}  # the k knn_score used: N if under 50
    if splits.ood_test is not None:
        held = rows[-1]  # appended last above
        result["held_out"] = {"classes": splits.ood_classes, "images": held["images"],
                              "ood_auroc": held["ood_auroc"],
                              "ood_auroc_msp": held["ood_auroc_msp"]}
    if band:
        result["band"] = band
    data.write_text(os.path.join(folder, "nearness.json"), json.dumps(result, indent=2))
    return result


def nearness_table(result):
    """The meter's result as a markdown table."""
    k = result.get("knn_k", 50)  # absent from a nearness.json written before it was recorded
    k_said = f"k = {k}" + ("" if k == 50 else f", all {k} of them: 50 asked")
    lines = [f"Reference: {result['reference']} (test accuracy {result['test_accuracy']:.4f}); "
             f"OOD AUROC against the {result['id_test_images']} real ID test images, ID positive, "
             f"k-NN score ({k_said}) on the real training images; 0.5 = indistinguishable.", "",
             "| images | strength | count | source accuracy | OOD AUROC (k-NN) | OOD AUROC (MSP) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {'ID' if r['kind'] == 'id' else 'near-OOD'} | {r['strength']:g} | "
                     f"{r['images']} | {r['source_accuracy']:.4f} | {r['ood_auroc']:.4f} | "
                     f"{r['ood_auroc_msp']:.4f} |")
    if "held_out" in result:
        h = result["held_out"]
        lines.append(f"| held-out classes {','.join(h['classes'])} (real) | - | "
                     f"{h['images']} | - | {h['ood_auroc']:.4f} | {h['ood_auroc_msp']:.4f} |")
    if "band" in result:
        b = result["band"]
        counts = ", ".join(f"{kept} of {n} at strength {s}"
                           for s, (kept, n) in b["kept_by_strength"].items())
        lines += ["", f"Band of {b['reference']} ({b['reference_images']} real images): k-NN score "
                  f"{b['low']:.4f} to {b['high']:.4f} (their {b['quantiles'][0]:g} to "
                  f"{b['quantiles'][1]:g} quantiles). Kept {b['kept']} of {b['near_ood_images']} "
                  f"synthetic near-OOD images ({counts}); "
                  + (f"copied into {b['folder']}" if b["folder"] else "none survives: nothing "
                     "written (no near_ood_band folder)")]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Pictures
def plot_tsne(groups, classes, path, seed=0, max_points=1500):
    """t-SNE of embeddings. groups: {name: (features, labels or None)}; groups with labels are
    coloured by class, the others (OOD test sets) drawn black."""
    from sklearn.manifold import TSNE
    plt = data.pyplot()
    g = torch.Generator().manual_seed(seed)  # the same subsample for the same seed
    names, feats, labs = [], [], []
    for name, (f, l) in groups.items():
        if f is None or len(f) == 0:  # an empty group: nothing to draw
            continue
        # an equal share of max_points for every group
        keep = torch.randperm(len(f), generator=g)[:max_points // max(1, len(groups))]
        names += [name] * len(keep)
        feats.append(F.normalize(f[keep].float(), dim=1))  # unit rows, as k-NN sees them
        # label -1: an OOD group, drawn black
        labs.append(l[keep] if l is not None else torch.full((len(keep),), -1))
    x = torch.cat(feats).numpy()  # (P, F) the sampled points of every group
    y2 = TSNE(n_components=2, perplexity=min(30, len(x) - 1), init="pca",  # perplexity must be < P
              random_state=seed).fit_transform(x)  # (P, 2)
    names, labs = np.asarray(names), torch.cat(labs).numpy()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))  # room for the legends on the right
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")  # 10 or 20 distinct colours
    style = {"test (ID)": dict(marker="o", s=14, alpha=0.85),
             "training (real)": dict(marker=".", s=8, alpha=0.35),  # faint: the background
             "synthetic ID": dict(marker="+", s=18, alpha=0.6),
             "synthetic near-OOD": dict(marker="x", s=18, alpha=0.6)}
    for name in dict.fromkeys(names):  # groups in first-seen order, once each
        sel = names == name  # (P,) bool
        if name in style:  # coloured by (source) class
            ax.scatter(y2[sel, 0], y2[sel, 1], c=[cmap(int(c) % cmap.N) for c in labs[sel]],
                       label=name, **style[name])
        else:  # OOD test sets: black
            ax.scatter(y2[sel, 0], y2[sel, 1], c="black", marker="^", s=16, alpha=0.8, label=name)
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N),
                          label=f"class {data.drawable(c)}") for i, c in enumerate(classes)]
    # add_artist: a second ax.legend call would replace this one
    ax.add_artist(ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1),
                            fontsize=8, title="colour"))
    # the marker legend in grey: the colour of a class-coloured group says nothing by itself
    markers = [plt.Line2D([], [], ls="", color="dimgrey" if name in style else "black",
                          marker=style[name]["marker"] if name in style else "^", label=name)
               for name in dict.fromkeys(names)]
    ax.legend(handles=markers, loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=8,
              title="marker")
    ax.set(title="t-SNE of the normalised encoder embeddings", xlabel="t-SNE 1",
           ylabel="t-SNE 2")
    return data.save_figure(fig, path)


def plot_ood_curves(results, path):
    """ROC and precision-recall curves of every OOD score (in-distribution = positive)."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    plt = data.pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))  # ROC left, precision-recall right
    for set_name, scores in results.items():
        for score_name, (s_in, s_out) in scores.items():
            y, s = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out]  # ID = 1
            fpr, tpr, _ = roc_curve(y, s)
            p, r, _ = precision_recall_curve(y, s)  # AUPR-In's curve
            label = f"{set_name}: {score_name} (AUROC {ood_metrics(s_in, s_out)['auroc']:.3f})"
            roc.plot(fpr, tpr, label=data.drawable(label))
            pr.plot(r, p, label=data.drawable(label))
    roc.plot([0, 1], [0, 1], ls=":", c="grey")  # chance: AUROC 0.5
    roc.set(xlabel="false positive rate (OOD accepted as ID)",
            ylabel="true positive rate (ID accepted)", title="OOD detection: ROC (ID = positive)")
    pr.set(xlabel="recall (ID)", ylabel="precision (ID)",
           title="OOD detection: precision-recall (AUPR-In)")
    roc.legend(fontsize=7)
    pr.legend(fontsize=7)
    return data.save_figure(fig, path)


def plot_classification_curves(y_true, probabilities, classes, path):
    """One-vs-rest ROC and precision-recall curves of the linear head, per class."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    plt = data.pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    y_true = np.asarray(y_true)
    for k, name in enumerate(classes):
        fpr, tpr, _ = roc_curve(y_true == k, probabilities[:, k])  # class k against the rest
        p, r, _ = precision_recall_curve(y_true == k, probabilities[:, k])
        roc.plot(fpr, tpr, label=f"class {data.drawable(name)}")
        pr.plot(r, p, label=f"class {data.drawable(name)}")
    roc.set(xlabel="false positive rate", ylabel="true positive rate",
            title="Classification: one-vs-rest ROC")
    pr.set(xlabel="recall", ylabel="precision",
           title="Classification: one-vs-rest precision-recall")
    roc.legend(fontsize=7, ncol=2)  # one legend: the two panels share colours
    return data.save_figure(fig, path)


def plot_confusion(confusion, classes, path, title):
    """One confusion matrix (rows: true class, columns: predicted; counts in the cells)."""
    plt = data.pyplot()
    c = np.asarray(confusion)  # (K, K) counts
    # 0.5 inch per class, plus room for the labels
    fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 2.5, 0.5 * len(classes) + 2))
    im = ax.imshow(c, cmap="Blues")  # darker = more images
    for i in range(len(classes)):
        for j in range(len(classes)):
            # white text on cells darker than half the maximum
            ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if c[i, j] > c.max() / 2 else "black")
    names = [data.drawable(name) for name in classes]
    ax.set_xticks(range(len(classes)), names, rotation=45 if len(max(names, key=len)) > 3 else 0)
    ax.set_yticks(range(len(classes)), names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    # fraction 0.046: the colour bar about as tall as the matrix (a common matplotlib idiom)
    fig.colorbar(im, ax=ax, fraction=0.046, label="test images")
    return data.save_figure(fig, path)


def grad_cam(model, classifier, x):
    """Grad-CAM (Selvaraju et al. 2017) on the encoder's last convolution: ReLU of the
    activation maps weighted by the spatially averaged gradient of the predicted class's logit.
    x: (B, C, H, W) normalised -> (B, H, W) heat-maps in [0, 1] and the predicted classes."""
    # the last Conv2d in module order: the coarsest maps, the most semantic
    conv = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    saved = {}  # "a": activations (B, K, h, w); "g": their gradient

    def keep_activation_and_its_gradient(module, inputs, output):
        saved["a"] = output  # (B, K, h, w), still in the graph
        output.register_hook(lambda grad: saved.__setitem__("g", grad))  # filled by backward

    handle = conv.register_forward_hook(keep_activation_and_its_gradient)
    was_training = model.training  # restored in `finally`
    model.eval()
    try:
        with torch.enable_grad():  # requires_grad: the hook fires even for a frozen encoder
            logits = classifier(model.encode(x.requires_grad_()))  # (B, classes)
            predicted = logits.argmax(1)  # the class each heat-map explains
            logits.gather(1, predicted[:, None]).sum().backward()  # the sum separates by image
    finally:
        handle.remove()  # a later forward must not fill `saved`
        model.train(was_training)
    weights = saved["g"].mean((2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * saved["a"]).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]  # each in [0, 1]
    return cam.detach(), predicted.detach()  # no graph kept past this call


def plot_grad_cam(model, classifier, test, classes, mean, std, device, path, per_class=2):
    """Grad-CAM heat-maps of the linear head on a few test images per class."""
    plt = data.pyplot()
    idx = torch.cat([torch.nonzero(test.labels == c).squeeze(1)[:per_class]  # per_class per class
                     for c in range(len(classes))])
    x = test.images[idx].to(device)  # uint8 (n, C, H, W) on the device
    cam, predicted = grad_cam(model, classifier, data.to_float(x, mean, std))
    cols = min(8, len(idx))  # at most 8 per row
    rows = (len(idx) + cols - 1) // cols  # ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(idx):
            continue
        img = x[k].cpu().permute(1, 2, 0).numpy()  # (H, W, C) uint8 for imshow
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")  # (H, W) for grey
        ax.imshow(cam[k].cpu().numpy(), cmap="jet", alpha=0.45)  # the heat-map, 45% opaque
        true, pred = classes[int(test.labels[idx[k]])], classes[int(predicted[k])]
        ax.set_title(data.drawable(f"{true} -> {pred}"), fontsize=7,
                     color="black" if true == pred else "red")  # red: misclassified
    fig.suptitle("Grad-CAM of the linear head on the last conv layer (true -> predicted)",
                 fontsize=9)
    return data.save_figure(fig, path)


# -----------------------------------------------------------------------------
# Plumbing: a run folder, and the command line
def run_settings(run_dir, overrides=None):
    """The data and synthetic settings of runs/<name>/config.json, with the defaults of options
    added after the run was made (an older run folder evaluates as it resumes). Read strictly
    (data.read_run_settings): the data options through their own types; train.py's others,
    which this file cannot parse, by data.RUN_SETTINGS's kinds, and unknown keys pass."""
    parser = data.add_synthetic_arguments(data.add_data_arguments(argparse.ArgumentParser()))
    defaults = parser.parse_args([])
    saved = data.read_run_settings(run_dir, "", parser, vars(defaults))
    # later wins: today's defaults < the saved config < the overrides
    return data.settings(defaults, saved, overrides or {})


def load_run(run_dir, device, overrides=None, splits=None):
    """runs/<name>: its settings, splits (read from its data unless given), model and
    classifier, and normalisation statistics."""
    args = run_settings(run_dir, overrides)
    state = data.load_torch_file(os.path.join(run_dir, "model.pt"), "model file")
    splits = splits or data.splits_from_args(args)
    if "classes" not in state:
        raise data.DataError(f"model file {os.path.join(run_dir, 'model.pt')}: not written by "
                             f"train.py (it holds no class list)")
    if splits.classes != state["classes"]:
        raise data.DataError(f"{run_dir}: the data's classes {splits.classes} differ from the "
                             f"run's {state.get('classes')}; pass the run's --data options")
    # what the network is: saved with the weights (older runs: from config.json)
    arch = state.get("architecture") or {k: getattr(args, k) for k in
                                         ("model", "loss", "embedding_dim")}
    _, C, H, _ = splits.train.images.shape
    model, classifier = supcon.build_model(arch["model"], arch["loss"], C, H, len(splits.classes),
                                           arch["embedding_dim"],
                                           # --negative-mode head's head, prototypes' buffer
                                           logit_head=arch.get("logit_head"),
                                           prototypes=arch.get("prototypes", False))
    model_file = os.path.join(run_dir, "model.pt")
    data.load_weights(model, state, "model", model_file, "model file")
    data.load_weights(classifier, state, "classifier", model_file, "model file")
    # eval(): batch norm on its running statistics, no dropout
    return (args, splits, model.to(device).eval(), classifier.to(device).eval(),
            state["mean"], state["std"])  # the training set's normalisation


def evaluate_run(run_dir, overrides=None, ood_data=None, device="auto", episodes=200,
                 pictures=True):
    """Evaluate runs/<name> (config.json + model.pt): metrics.json and report.md again."""
    dev = data.pick_device(device)
    args, splits, model, classifier, mean, std = load_run(run_dir, dev, overrides)
    if not len(splits.test):
        raise data.DataError("the data has no test images; lower --val-fraction's 0")
    synthetic = None  # the run's synthetic images, for the t-SNE picture only
    try:
        if args.synthetic:  # the synthetic images in the roles the run gave them
            used = [part for part in data.synthetic_roles(args, splits)[:2] if part is not None]
            synthetic = data.ImageSet.concat(used) if used else None
    except data.DataError as error:  # the set is gone, or does not fit this data any more
        print(f"the run's synthetic set is not read ({str(error)[:120]}...): the t-SNE shows "
              f"real images only")
    negatives = run_negatives(args, splits, run_dir)  # k-NN+neg's OOD reference, or None
    _, C, H, _ = splits.train.images.shape
    external = load_ood_folder(ood_data, C, H, args.resize) if ood_data else None
    metrics = evaluate(model, classifier, splits, mean, std, dev, run_dir, synthetic, external,
                       episodes, pictures, args.seed, negatives)
    previous = {}  # the training-only numbers of the run
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            previous = json.load(f)
    kept = ("train_minutes", "epochs", "optimizer_steps")  # what only training knows
    metrics = {**{k: previous[k] for k in kept if k in previous}, **metrics}  # new ones win
    data.write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2))
    return metrics


def run_negatives(args, splits, run_dir):
    """The negative-only images a run trained with (its config.json's --negatives role of
    --synthetic, its --negative-data), read again as train.py read them: k-NN+neg's OOD
    reference; None if it had none. Refused in one line if they cannot be read: without them
    the run's k-NN+neg would silently go missing from metrics.json."""
    if args.negatives == "none" and not args.negative_data:
        return None
    try:
        used = data.training_set(args, splits)[0]  # train.py's reader: the same images
    except data.DataError as error:
        raise data.DataError(f"{run_dir}: the run's negatives (--negative-data "
                             f"{args.negative_data}, --negatives {args.negatives} of --synthetic "
                             f"{args.synthetic}), the OOD reference of its {KNN_NEG} score, cannot "
                             f"be read ({str(error).splitlines()[0].rstrip('.')}); put them back "
                             f"where config.json says") from error
    return used.subset(used.negative_only)


def build_parser():
    """evaluate.py's command line: a run folder again, or the nearness meter."""
    p = data.add_data_arguments(data.Parser(__doc__, "evaluate.py"))
    p.add_argument("run", nargs="?", default=None, help="a run folder written by train.py")
    p.add_argument("--ood-data", default=None, help="a folder of OOD images (any layout)")
    p.add_argument("--episodes", type=data.int_at_least(1), default=200,
                   help="few-shot episodes per setting (200 gives intervals of about +-0.02)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    p.add_argument("--no-pictures", action="store_true", help="metrics only")
    n = p.add_argument_group("nearness meter")
    n.add_argument("--nearness", default=None, metavar="DIR",
                   help="measure how near DIR's synthetic images are (give the data options that "
                        "made DIR); writes DIR/nearness.json")
    n.add_argument("--run", dest="reference_run", default=None, metavar="RUN",  # 'run' is taken
                   help="--nearness: use this run's encoder and linear head as the reference")
    n.add_argument("--reference-epochs", type=data.int_at_least(1), default=30,
                   help="--nearness without --run: epochs of the reference classifier")
    n.add_argument("--band-of", default=None, metavar="REAL",
                   help="--nearness: keep the synthetic near-OOD images whose k-NN score lies "
                        "in the band of REAL's real near-OOD images (5%%-95%%), copied into "
                        "DIR/near_ood_band/ for train.py --negative-data")
    return p


# the options of evaluate.py's two modes: re-evaluating a run folder, or the nearness meter
MODE_OPTIONS = {"reference_run": ("--nearness",), "reference_epochs": ("--nearness",),
                "band_of": ("--nearness",),
                **{k: ("a run folder",) for k in ("run", "ood_data", "episodes", "no_pictures")}}


def main(argv=None):
    """Re-evaluate a run folder (optionally on other data), or run the nearness meter."""
    parser = build_parser()
    a = parser.parse_args(argv)
    given = data.given_options(parser, argv)
    # the data options typed on the command line: they replace a run's own settings
    data_options = set(vars(data.add_data_arguments(argparse.ArgumentParser()).parse_args([])))
    overrides = {k: getattr(a, k) for k in given & data_options}  # typed data options
    # options of one mode that the other would not read
    mode = "--nearness" if a.nearness else "a run folder"
    data.refuse_without_effect(given, MODE_OPTIONS, mode, "with --nearness" if a.nearness else
                               "without --nearness",
                               {"reference_run": "--run", "run": "a run folder"})
    if a.nearness:
        data.require_manifest(a.nearness, "--nearness")
        if a.band_of and not os.path.isdir(a.band_of):  # before the reference is trained
            raise data.DataError(f"--band-of {a.band_of}: no such folder")
        if a.band_of and not data.image_files(a.band_of, collections.Counter()):
            raise data.DataError(f"--band-of {a.band_of}: no images there; give a folder of "
                                 f"real near-OOD photographs")
        result = nearness(a.nearness, a, a.reference_run, overrides, a.device, a.reference_epochs,
                          a.band_of)
        print(nearness_table(result))
        print(f"wrote {os.path.join(a.nearness, 'nearness.json')}")
        return result
    if not a.run:
        parser.error("give a run folder (runs/<name>) or --nearness DIR")  # exit status 2, one line
    if a.ood_data and not os.path.isdir(a.ood_data):  # before the run's data loads
        raise data.DataError(f"--ood-data {a.ood_data}: no such folder")
    m = evaluate_run(a.run, overrides, a.ood_data, a.device, a.episodes, not a.no_pictures)
    print(f"test accuracy {m['test_accuracy']:.4f} (k-NN {m['knn_accuracy']:.4f}, k-NN top-5 "
          f"hit {m['knn_top5_hit']:.4f})")
    for set_name, scores in m["ood"].items():
        print(f"OOD {set_name}: " + ", ".join(f"{s} AUROC {v['auroc']:.4f}"
                                              for s, v in scores.items()))
    for name, v in (m.get("few_shot") or {}).items():  # absent without held-out classes
        if v:  # None: too few classes for an episode
            p, n = v["prototype"], v["nearest_neighbour"]
            print(f"{name} ({v['ways']}-way): prototype {p['mean']:.4f} ± {p['ci95']:.4f}, "
                  f"nearest neighbour {n['mean']:.4f} ± {n['ci95']:.4f}")
    print(f"wrote {os.path.join(a.run, 'metrics.json')}"
          + ("" if a.no_pictures else f" and {os.path.join(a.run, 'report.md')}"))
    return m


if __name__ == "__main__":
    data.run_command(main)
