"""
evaluate.py -- classification, out-of-distribution (OOD) detection and few-shot evaluation of a
trained run, with the pictures that explain it.

  Classification   accuracy, macro precision / recall / F1, one-vs-rest ROC-AUC, confusion matrix,
                   for the linear head and for a k-NN classifier on the embeddings.
  OOD detection    scores: maximum softmax probability (MSP, Hendrycks & Gimpel 2017); k-NN distance
                   on normalised embeddings (Sun et al. 2022: minus the distance to the k-th nearest
                   training embedding, k = 50); Mahalanobis (Lee et al. 2018: class means, one shared
                   covariance, max over classes of minus the squared distance).
                   Metrics: AUROC, AUPR-In, AUPR-Out, FPR at 95% TPR. Convention: in-distribution
                   is the POSITIVE class, a higher score means "more in-distribution".
  Few-shot         N-way K-shot episodes on the held-out (unseen) classes: nearest-prototype and
                   nearest-neighbour accuracy, mean and 95% confidence interval.

Run:  python evaluate.py runs/<name>  [--ood-data PATH]
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract_features(model, images, mean, std, device, batch_size=512):
    """Encoder features (N, F) of uint8 images (N, C, H, W), no augmentation, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = (x.float() / 255.0 - mean.to(device).view(1, -1, 1, 1)) / std.to(device).view(1, -1, 1, 1)
        out.append(model.encode(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# -----------------------------------------------------------------------------
# OOD scores: higher = more in-distribution


def knn_score(train_features, test_features, k=50, batch_size=2048):
    """Sun et al. 2022: minus the distance from each normalised test embedding to its k-th nearest
    normalised training embedding. (N_test,)"""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test_features), batch_size):
        test = F.normalize(test_features[start:start + batch_size].float(), dim=1)
        distances = torch.cdist(test, train)  # (b, N_train)
        scores.append(-distances.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(scores)


def msp_score(logits):
    """Maximum softmax probability of the linear head. (N,)"""
    return logits.float().softmax(1).max(1).values


def mahalanobis_score(train_features, train_labels, test_features):
    """Max over classes of minus the squared Mahalanobis distance to the class mean, with one
    covariance shared by all classes (estimated on normalised training embeddings). (N_test,)"""
    train = F.normalize(train_features.double(), dim=1)
    test = F.normalize(test_features.double(), dim=1)
    classes = torch.unique(train_labels)
    means = torch.stack([train[train_labels == c].mean(0) for c in classes])  # (K, F)
    centred = train - means[torch.searchsorted(classes, train_labels)]
    precision = torch.linalg.pinv(centred.T @ centred / len(train), hermitian=True)  # (F, F)
    diff = test[:, None, :] - means[None]  # (N, K, F)
    d2 = torch.einsum("nkf,fg,nkg->nk", diff, precision, diff)
    return (-d2.min(1).values).float()  # max over classes of -d^2


# -----------------------------------------------------------------------------
# Metrics


def ood_metrics(score_in, score_out):
    """AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR, in-distribution = positive class.

    FPR@95: the share of OOD samples scored at or above the threshold that keeps 95% of the
    in-distribution samples (lower is better). AUPR-Out treats OOD as positive with negated scores.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    s_in, s_out = np.asarray(score_in, dtype=np.float64), np.asarray(score_out, dtype=np.float64)
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    # the largest threshold that keeps at least 95% of ID scores at or above it
    threshold = np.sort(s_in)[int(math.floor(0.05 * len(s_in)))]
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr95": float(np.mean(s_out >= threshold)),
    }


def classification_metrics(y_true, probabilities):
    """Accuracy, macro precision / recall / F1, one-vs-rest ROC-AUC and the confusion matrix."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score)
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(1, keepdims=True)  # rows sum to 1 (sklearn's OvR needs it)
    y_pred = probabilities.argmax(1)
    K = probabilities.shape[1]
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(K), average="macro",
                                                  zero_division=0)
    try:
        auc = float(roc_auc_score(y_true, probabilities, multi_class="ovr", labels=range(K))) \
            if K > 2 else float(roc_auc_score(y_true, probabilities[:, 1]))
    except ValueError:  # a class missing from y_true
        auc = float("nan")
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p),
            "recall": float(r), "f1": float(f1), "roc_auc": auc,
            "confusion": confusion_matrix(y_true, y_pred, labels=range(K)).tolist()}


def knn_probabilities(train_features, train_labels, test_features, num_classes, k=20):
    """k-NN classifier on normalised embeddings (cosine similarity): the class shares among the k
    nearest training embeddings, as (N_test, K) probabilities."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    neighbours = (test @ train.T).topk(k, dim=1).indices  # (N, k)
    votes = F.one_hot(train_labels[neighbours], num_classes).float().mean(1)  # (N, K)
    return votes


def summary_metrics(model, classifier, splits, train_set, mean, std, device, k=50):
    """What train.py prints at the end: linear-head and k-NN test accuracy, and OOD detection
    against the held-out classes (k-NN score and MSP)."""
    train_features = extract_features(model, train_set.images, mean, std, device)
    test_features = extract_features(model, splits.test.images, mean, std, device)
    with torch.no_grad():
        test_logits = classifier(test_features.to(device)).float().cpu()
    K = len(splits.classes)
    out = {"test_accuracy": classification_metrics(splits.test.labels, test_logits.softmax(1))["accuracy"],
           "knn_accuracy": classification_metrics(
               splits.test.labels, knn_probabilities(train_features, train_set.labels, test_features, K))["accuracy"]}
    if splits.ood_test is not None:
        ood_features = extract_features(model, splits.ood_test.images, mean, std, device)
        with torch.no_grad():
            ood_logits = classifier(ood_features.to(device)).float().cpu()
        out["ood_auroc_knn"] = ood_metrics(knn_score(train_features, test_features, k),
                                           knn_score(train_features, ood_features, k))["auroc"]
        out["ood_auroc_msp"] = ood_metrics(msp_score(test_logits), msp_score(ood_logits))["auroc"]
    return out
