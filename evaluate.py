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

import data

# -----------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract_features(model, images, mean, std, device, batch_size=512):
    """Encoder features (N, F) of uint8 images (N, C, H, W), no augmentation, in eval mode."""
    was_training = model.training  # restored at the end: callers may be mid-training
    model.eval()  # batch-norm running statistics, no dropout
    out = []  # (b, F) blocks
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)  # (b, C, H, W) uint8
        x = data.to_float(x, mean.to(device), std.to(device))  # the training normalisation, no augmentation
        out.append(model.encode(x).float().cpu())  # (b, F) encoder features, not the head's output
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# -----------------------------------------------------------------------------
# OOD scores: higher = more in-distribution


def knn_score(train_features, test_features, k=50, batch_size=2048):
    """Sun et al. 2022: minus the distance from each normalised test embedding to its k-th nearest
    normalised training embedding. (N_test,)"""
    train = F.normalize(train_features.float(), dim=1)  # (N_train, F) unit rows
    k = min(k, len(train))  # a small training set cannot have a 50th neighbour
    scores = []  # (b,) blocks: a (b, N_train) distance matrix at a time bounds the memory
    for start in range(0, len(test_features), batch_size):
        test = F.normalize(test_features[start:start + batch_size].float(), dim=1)  # (b, F) unit rows
        distances = torch.cdist(test, train)  # (b, N_train)
        scores.append(-distances.topk(k, dim=1, largest=False).values[:, -1])  # (b,) minus the k-th smallest distance
    return torch.cat(scores)


def msp_score(logits):
    """Maximum softmax probability of the linear head. (N,)"""
    return logits.float().softmax(1).max(1).values  # (N,) max_k p(k | x)


def mahalanobis_score(train_features, train_labels, test_features):
    """Max over classes of minus the squared Mahalanobis distance to the class mean, with one
    covariance shared by all classes (estimated on normalised training embeddings). (N_test,)"""
    train = F.normalize(train_features.double(), dim=1)  # (N_train, F); float64 for the inverse below
    test = F.normalize(test_features.double(), dim=1)  # (N_test, F)
    classes = torch.unique(train_labels)  # (K,) sorted class ids present in training
    means = torch.stack([train[train_labels == c].mean(0) for c in classes])  # (K, F)
    centred = train - means[torch.searchsorted(classes, train_labels)]  # (N_train, F) x - mu_{y(x)}
    precision = torch.linalg.pinv(centred.T @ centred / len(train), hermitian=True)  # (F, F)
    diff = test[:, None, :] - means[None]  # (N, K, F)
    d2 = torch.einsum("nkf,fg,nkg->nk", diff, precision, diff)  # (N, K) (x - mu_k)^T Sigma^-1 (x - mu_k)
    return (-d2.min(1).values).float()  # max over classes of -d^2


# -----------------------------------------------------------------------------
# Metrics


def ood_metrics(score_in, score_out):
    """AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR, in-distribution = positive class.

    FPR@95: the share of OOD samples scored at or above the threshold that keeps 95% of the
    in-distribution samples (lower is better). AUPR-Out treats OOD as positive with negated scores.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    s_in, s_out = np.asarray(score_in, dtype=np.float64), np.asarray(score_out, dtype=np.float64)  # higher = more ID
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]  # in-distribution is the positive class
    s = np.r_[s_in, s_out]  # scores in the same order as y
    # the largest threshold that keeps at least 95% of ID scores at or above it
    threshold = np.sort(s_in)[int(math.floor(0.05 * len(s_in)))]  # 95% of ID scores lie at or above it
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
    probabilities = np.asarray(probabilities, dtype=np.float64)  # (N, K) rows summing to 1
    probabilities = probabilities / probabilities.sum(1, keepdims=True)  # rows sum to 1 (sklearn's OvR needs it)
    y_pred = probabilities.argmax(1)  # (N,) predicted class ids
    K = probabilities.shape[1]  # number of classes
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(K), average="macro",
                                                  zero_division=0)
    try:
        auc = float(roc_auc_score(y_true, probabilities, multi_class="ovr", labels=range(K))) \
            if K > 2 else float(roc_auc_score(y_true, probabilities[:, 1]))
    except ValueError:  # a class missing from y_true
        auc = float("nan")  # a class missing from y_true: one-vs-rest AUC is undefined
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p),
            "recall": float(r), "f1": float(f1), "roc_auc": auc,
            "confusion": confusion_matrix(y_true, y_pred, labels=range(K)).tolist()}


def knn_probabilities(train_features, train_labels, test_features, num_classes, k=20):
    """k-NN classifier on normalised embeddings (cosine similarity): the class shares among the k
    nearest training embeddings, as (N_test, K) probabilities."""
    train = F.normalize(train_features.float(), dim=1)  # (N_train, F) unit rows
    test = F.normalize(test_features.float(), dim=1)  # (N_test, F)
    k = min(k, len(train))  # at most every training embedding
    neighbours = (test @ train.T).topk(k, dim=1).indices  # (N, k)
    votes = F.one_hot(train_labels[neighbours], num_classes).float().mean(1)  # (N, K)
    return votes


# -----------------------------------------------------------------------------
# Few-shot on unseen classes (the seed metric-learning project)


def few_shot_episodes(labels, n_shot, episodes=200, n_query=15, seed=0):
    """N-way K-shot episodes over every class in `labels` (N = number of classes): for each episode
    and class, n_shot support and up to n_query query indices, disjoint, drawn without replacement.
    Classes with fewer than n_shot + 1 images are left out. Returns [(support, support_labels,
    query, query_labels)] as index / label tensors."""
    g = torch.Generator().manual_seed(seed)
    # need a query left after the support
    classes = [c for c in torch.unique(labels).tolist() if (labels == c).sum() > n_shot]  # need queries too
    if len(classes) < 2:
        return []
    out = []
    for _ in range(episodes):
        support, s_lab, query, q_lab = [], [], [], []
        for way, c in enumerate(classes):
            idx = torch.nonzero(labels == c).squeeze(1)  # (n_c,) images of class c
            idx = idx[torch.randperm(len(idx), generator=g)]  # shuffled: support and query are disjoint slices
            support.append(idx[:n_shot])
            query.append(idx[n_shot:n_shot + n_query])
            s_lab += [way] * n_shot  # labels are ways 0..N-1, not the class ids
            q_lab += [way] * len(query[-1])
        out.append((torch.cat(support), torch.tensor(s_lab), torch.cat(query), torch.tensor(q_lab)))
    return out


def few_shot_accuracy(features, labels, n_shot, episodes=200, seed=0):
    """Nearest-prototype (class mean of the normalised support embeddings) and nearest-neighbour
    accuracy over episodes, cosine similarity; mean and 95% confidence interval (1.96 sd / sqrt n)."""
    z = F.normalize(features.float(), dim=1)  # (N, F) unit rows
    runs = few_shot_episodes(labels, n_shot, episodes, seed=seed)  # (support, labels, query, labels)
    if not runs:
        return None
    proto_acc, nn_acc = [], []  # one accuracy per episode, each
    for support, s_lab, query, q_lab in runs:
        ways = int(s_lab.max()) + 1  # N of the N-way episodes
        prototypes = F.normalize(torch.stack([z[support][s_lab == w].mean(0) for w in range(ways)]), dim=1)
        proto_acc.append(((z[query] @ prototypes.T).argmax(1) == q_lab).float().mean().item())
        nn_acc.append((s_lab[(z[query] @ z[support].T).argmax(1)] == q_lab).float().mean().item())

    def summary(values):
        values = np.asarray(values)  # (episodes,) accuracies
        return {"mean": float(values.mean()), "ci95": float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))}
    return {"ways": ways, "episodes": len(runs), "prototype": summary(proto_acc),
            "nearest_neighbour": summary(nn_acc)}


# -----------------------------------------------------------------------------
# Pictures


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    """Save a figure as PNG under a temporary name, then rename; close it. Returns the file name."""
    fig.savefig(path + ".tmp.png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    os.replace(path + ".tmp.png", path)
    return os.path.basename(path)


def plot_tsne(groups, classes, path, seed=0, max_points=1500):
    """t-SNE of embeddings. groups: {name: (features, labels or None)}; test ID points are coloured
    by class, the other groups get their own marker."""
    from sklearn.manifold import TSNE
    plt = pyplot()
    g = torch.Generator().manual_seed(seed)
    names, feats, labs = [], [], []
    for name, (f, l) in groups.items():
        if f is None or len(f) == 0:
            continue
        keep = torch.randperm(len(f), generator=g)[:max_points // max(1, len(groups))]
        names += [name] * len(keep)
        feats.append(F.normalize(f[keep].float(), dim=1))
        labs.append(l[keep] if l is not None else torch.full((len(keep),), -1))
    x = torch.cat(feats).numpy()  # (P, F) the sampled points of every group
    y2 = TSNE(n_components=2, perplexity=min(30, len(x) - 1), init="pca", random_state=seed).fit_transform(x)
    names, labs = np.asarray(names), torch.cat(labs).numpy()  # (P,) group name and class of each point
    fig, ax = plt.subplots(figsize=(7.5, 6.5))  # room for the legends on the right
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")  # one colour per class
    style = {"test (ID)": dict(marker="o", s=14, alpha=0.85),
             "training (real)": dict(marker=".", s=8, alpha=0.35),
             "synthetic ID": dict(marker="+", s=18, alpha=0.6),
             "synthetic near-OOD (negatives)": dict(marker="x", s=18, alpha=0.6)}
    for name in dict.fromkeys(names):
        sel = names == name  # (P,) the points of this group
        if name in style:  # coloured by (source) class
            ax.scatter(y2[sel, 0], y2[sel, 1], c=[cmap(int(c) % cmap.N) for c in labs[sel]], label=name, **style[name])
        else:  # OOD test sets: black
            ax.scatter(y2[sel, 0], y2[sel, 1], c="black", marker="^", s=16, alpha=0.8, label=name)
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=f"class {c}")
               for i, c in enumerate(classes)]
    legend1 = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="colour")
    ax.add_artist(legend1)
    # the marker legend in grey: the colour of a class-coloured group says nothing by itself
    markers = [plt.Line2D([], [], ls="", color="dimgrey" if name in style else "black",
                          marker=style[name]["marker"] if name in style else "^", label=name)
               for name in dict.fromkeys(names)]
    ax.legend(handles=markers, loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=8, title="marker")
    ax.set_title("t-SNE of the normalised encoder embeddings")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    return save_figure(fig, path)


def plot_ood_curves(results, path):
    """ROC and precision-recall curves of every OOD score (in-distribution = positive)."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    plt = pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for set_name, scores in results.items():
        for score_name, (s_in, s_out) in scores.items():
            y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
            s = np.r_[s_in, s_out]
            fpr, tpr, _ = roc_curve(y, s)
            p, r, _ = precision_recall_curve(y, s)
            label = f"{set_name}: {score_name} (AUROC {ood_metrics(s_in, s_out)['auroc']:.3f})"
            roc.plot(fpr, tpr, label=label)
            pr.plot(r, p, label=label)
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    roc.set(xlabel="false positive rate (OOD accepted as ID)", ylabel="true positive rate (ID accepted)",
            title="OOD detection: ROC (ID = positive)")
    pr.set(xlabel="recall (ID)", ylabel="precision (ID)", title="OOD detection: precision-recall (AUPR-In)")
    roc.legend(fontsize=7)
    pr.legend(fontsize=7)
    return save_figure(fig, path)


def plot_classification_curves(y_true, probabilities, classes, path):
    """One-vs-rest ROC and precision-recall curves of the linear head, per class."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    plt = pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    y_true = np.asarray(y_true)
    for k, name in enumerate(classes):
        fpr, tpr, _ = roc_curve(y_true == k, probabilities[:, k])
        p, r, _ = precision_recall_curve(y_true == k, probabilities[:, k])
        roc.plot(fpr, tpr, label=f"class {name}")
        pr.plot(r, p, label=f"class {name}")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="Classification: one-vs-rest ROC")
    pr.set(xlabel="recall", ylabel="precision", title="Classification: one-vs-rest precision-recall")
    roc.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_confusion(confusion, classes, path, title):
    """One confusion matrix (rows: true class, columns: predicted; counts written in the cells)."""
    plt = pyplot()
    c = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 2.5, 0.5 * len(classes) + 2))
    im = ax.imshow(c, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if c[i, j] > c.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45 if len(max(classes, key=len)) > 3 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="test images")
    return save_figure(fig, path)


def grad_cam(model, classifier, x):
    """Grad-CAM (Selvaraju et al. 2017) on the encoder's last convolution: ReLU of the activation
    maps weighted by the spatially averaged gradient of the predicted class's logit.
    x: (B, C, H, W) normalised -> (B, H, W) heat-maps in [0, 1] and the predicted classes."""
    # the last conv: the finest map that still knows the class
    conv = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    saved = {}  # "a": activations (B, K, h, w); "g": their gradient

    def keep_activation_and_its_gradient(module, inputs, output):
        saved["a"] = output
        output.register_hook(lambda grad: saved.__setitem__("g", grad))  # dy_c / dA, filled in by backward

    handle = conv.register_forward_hook(keep_activation_and_its_gradient)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # (B, classes); requires_grad so the hook fires even for a frozen encoder
            logits = classifier(model.encode(x.requires_grad_()))
            predicted = logits.argmax(1)  # (B,) the class each heat-map explains
            # d y_c / dA for every image at once (the sum separates by image)
            logits.gather(1, predicted[:, None]).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    weights = saved["g"].mean((2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * saved["a"]).sum(1, keepdim=True))  # (B, 1, h, w)
    # (B, H, W) up to the image size
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]  # each map scaled to [0, 1]
    return cam.detach(), predicted.detach()


def plot_grad_cam(model, classifier, test, classes, mean, std, device, path, per_class=2):
    """Grad-CAM heat-maps (Selvaraju et al. 2017) of the linear head on a few test images per class."""
    plt = pyplot()
    idx = torch.cat([torch.nonzero(test.labels == c).squeeze(1)[:per_class] for c in range(len(classes))])
    x = test.images[idx].to(device)
    xn = data.to_float(x, mean, std)  # (B, C, H, W) normalised
    cam, predicted = grad_cam(model, classifier, xn)
    cols = min(8, len(idx))
    rows = (len(idx) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(idx):
            continue
        img = x[k].cpu().permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")
        ax.imshow(cam[k].cpu().numpy(), cmap="jet", alpha=0.45)
        true, pred = classes[int(test.labels[idx[k]])], classes[int(predicted[k])]
        ax.set_title(f"{true} -> {pred}", fontsize=7, color="black" if true == pred else "red")
    fig.suptitle("Grad-CAM of the linear head on the last conv layer (true -> predicted)", fontsize=9)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# The whole evaluation


def evaluate(model, classifier, splits, labelled, mean, std, device, run_dir=None, synthetic=None,
             external_ood=None, k=50, episodes=200, pictures=True, seed=0):
    """Every metric (and, with run_dir and pictures, every picture and report.md) of a trained model.

    labelled: the training images the classifier saw (real + ID synthetic): the k-NN reference set.
    synthetic: the synthetic ImageSet (for the t-SNE), external_ood: an ImageSet of OOD images."""
    mean, std = mean.to(device), std.to(device)  # (C,) the training normalisation
    # uint8 images -> (N, F) encoder features; features -> (N, K) logits of the linear head
    feats = lambda images: extract_features(model, images, mean, std, device)  # noqa: E731
    logits_of = lambda f: classifier(f.to(device)).float().cpu()  # noqa: E731
    train_f, test_f = feats(labelled.images), feats(splits.test.images)  # (N_train, F), (N_test, F) encoder features
    with torch.no_grad():
        test_logits = logits_of(test_f)  # (N_test, K) the linear head's logits
    K = len(splits.classes)  # training classes (the held-out ones excluded)
    # the linear probe (the thesis's classifier)
    linear = classification_metrics(splits.test.labels, test_logits.softmax(1))
    # a classifier on the embeddings
    knn = classification_metrics(splits.test.labels, knn_probabilities(train_f, labelled.labels, test_f, K))
    # the two headline numbers first; everything else nested (metrics.json is read by people)
    out = {"test_accuracy": linear["accuracy"], "knn_accuracy": knn["accuracy"],
           "classification": {"linear": linear, "knn": knn}, "ood": {},
           "ood_convention": "in-distribution is the positive class; higher score = more in-distribution"}
    # ---- OOD detection
    ood_sets = {}  # name -> ImageSet of OOD test images
    if splits.ood_test is not None:
        ood_sets[f"held-out classes {','.join(splits.ood_classes)}"] = splits.ood_test
    if external_ood is not None:
        ood_sets["external"] = external_ood
    curves, ood_feats = {}, {}  # for the pictures and the few-shot episodes
    in_scores = {"MSP": msp_score(test_logits), "k-NN": knn_score(train_f, test_f, k),
                 "Mahalanobis": mahalanobis_score(train_f, labelled.labels, test_f)}
    for name, images in ood_sets.items():
        f = feats(images.images)  # (N_ood, F)
        ood_feats[name] = (f, images.labels)
        with torch.no_grad():
            out_scores = {"MSP": msp_score(logits_of(f)), "k-NN": knn_score(train_f, f, k),
                          "Mahalanobis": mahalanobis_score(train_f, labelled.labels, f)}
        # ID test vs this OOD set, per score
        out["ood"][name] = {s: ood_metrics(in_scores[s], out_scores[s]) for s in in_scores}
        curves[name] = {s: (in_scores[s].numpy(), out_scores[s].numpy()) for s in in_scores}
    if splits.ood_test is not None:  # the thesis's two OOD numbers, at the top level too
        held = out["ood"][f"held-out classes {','.join(splits.ood_classes)}"]
        out["ood_auroc_knn"], out["ood_auroc_msp"] = held["k-NN"]["auroc"], held["MSP"]["auroc"]
    # ---- few-shot on the unseen classes
    if splits.ood_test is not None:
        # unseen classes: the model never trained on them
        f, labels = ood_feats[f"held-out classes {','.join(splits.ood_classes)}"]
        out["few_shot"] = {f"{n}-shot": few_shot_accuracy(f, labels, n, episodes, seed) for n in (1, 5)}
    if run_dir is None or not pictures:
        return out
    # ---- pictures and report
    files = {}  # picture title -> file, in report order
    real = labelled.kind == data.KIND_REAL  # (N_train,) the real training images among the labelled
    groups = {"test (ID)": (test_f, splits.test.labels),  # name -> (features, labels or None)
              "training (real)": (train_f[real], labelled.labels[real])}
    if synthetic is not None and len(synthetic):
        syn_f = feats(synthetic.images)  # (N_syn, F) where the synthetic images land
        for kind, name in ((data.KIND_ID, "synthetic ID"), (data.KIND_NEAR_OOD, "synthetic near-OOD (negatives)")):
            sel = synthetic.kind == kind  # (N_syn,) the synthetic images of this kind
            if sel.any():
                groups[name] = (syn_f[sel], synthetic.labels[sel])
    for name, (f, _) in ood_feats.items():
        groups[f"OOD test: {name}"] = (f, None)  # no class colours: these classes were never trained
    files["t-SNE"] = plot_tsne(groups, splits.classes, os.path.join(run_dir, "tsne.png"), seed)
    if curves:
        files["OOD ROC and PR"] = plot_ood_curves(curves, os.path.join(run_dir, "ood_curves.png"))
    files["classification ROC and PR"] = plot_classification_curves(
        splits.test.labels.numpy(), test_logits.softmax(1).numpy(), splits.classes,
        os.path.join(run_dir, "classification_curves.png"))
    files["confusion matrix"] = plot_confusion(linear["confusion"], splits.classes,
                                               os.path.join(run_dir, "confusion.png"),
                                               "Confusion matrix of the linear head (test set)")
    files["Grad-CAM"] = plot_grad_cam(model, classifier, splits.test, splits.classes, mean, std, device,
                                      os.path.join(run_dir, "grad_cam.png"))
    write_report(out, files, run_dir)
    return out


def write_report(metrics, files, run_dir):
    """report.md: the numbers as tables, then the pictures."""
    lines = ["# Evaluation report", "", f"Run folder: `{run_dir}`", "", "## Classification (test set)", "",
             "| classifier | accuracy | precision | recall | F1 | ROC-AUC (OvR) |", "|---|---|---|---|---|---|"]
    for name, m in metrics["classification"].items():
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} | "
                     f"{m['f1']:.4f} | {m['roc_auc']:.4f} |")
    if metrics["ood"]:
        lines += ["", "## OOD detection", "", f"Convention: {metrics['ood_convention']}. "
                  "FPR@95: share of OOD images accepted at the threshold that keeps 95% of ID test images.", "",
                  "| OOD set | score | AUROC | AUPR-In | AUPR-Out | FPR@95 |", "|---|---|---|---|---|---|"]
        for set_name, scores in metrics["ood"].items():
            for score, m in scores.items():
                lines.append(f"| {set_name} | {score} | {m['auroc']:.4f} | {m['aupr_in']:.4f} | "
                             f"{m['aupr_out']:.4f} | {m['fpr95']:.4f} |")
    if metrics.get("few_shot"):
        lines += ["", "## Few-shot on the held-out classes", "",
                  "| episodes | ways | nearest prototype | nearest neighbour |", "|---|---|---|---|"]
        for name, m in metrics["few_shot"].items():
            if m:
                lines.append(f"| {name}, {m['episodes']} | {m['ways']} | {m['prototype']['mean']:.4f} ± "
                             f"{m['prototype']['ci95']:.4f} | {m['nearest_neighbour']['mean']:.4f} ± "
                             f"{m['nearest_neighbour']['ci95']:.4f} |")
        lines.append("")
        lines.append("(mean ± 95% confidence interval over episodes)")
    lines += ["", "## Pictures", ""]
    for title, name in files.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    data.atomic_write_text("\n".join(lines) + "\n", os.path.join(run_dir, "report.md"))


def load_ood_folder(path, channels, size, resize):
    """Every image under `path` (any layout) as an OOD ImageSet (labels 0)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(data.IMAGE_EXTENSIONS))
    if not files:
        raise data.DataError(f"--ood-data {path}: no images found ({', '.join(data.IMAGE_EXTENSIONS)})")
    images = torch.stack([data.open_image(f, channels, size, resize) for f in files])
    return data.ImageSet(images, torch.zeros(len(files), dtype=torch.long), ["ood"], names=files)


def evaluate_run(run_dir, overrides=None, ood_data=None, device="auto", k=50, episodes=200, pictures=True):
    """Load runs/<name> (config.json + model.pt), evaluate, write metrics.json and report.md."""
    import supcon
    config_path, model_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "model.pt")
    for p in (config_path, model_path):
        if not os.path.exists(p):
            raise SystemExit(f"{run_dir}: no {os.path.basename(p)}; evaluate a finished run folder of train.py")
    with open(config_path) as f:
        args = argparse.Namespace(**json.load(f))
    for key, value in (overrides or {}).items():
        setattr(args, key, value)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    state = torch.load(model_path, map_location=dev, weights_only=True)
    import train  # the same training set the run saw (real, synthetic positives and negatives)
    splits, train_set = train.load_training_data(args)
    if splits.classes != state["classes"]:
        raise SystemExit(f"the data's classes {splits.classes} differ from the run's {state['classes']}")
    _, C, H, _ = splits.train.images.shape
    model, classifier = supcon.build_model(args.model, args.loss, C, H, len(splits.classes), args.embedding_dim)
    model.load_state_dict(state["model"])
    classifier.load_state_dict(state["classifier"])
    model, classifier = model.to(dev).eval(), classifier.to(dev).eval()
    labelled = train_set.subset(torch.nonzero(~train_set.negative_only).squeeze(1))
    synthetic = train_set.subset(torch.nonzero(train_set.kind != data.KIND_REAL).squeeze(1))
    external = load_ood_folder(ood_data, C, H, args.resize) if ood_data else None
    metrics = evaluate(model, classifier, splits, labelled, state["mean"], state["std"], dev, run_dir,
                       synthetic, external, k, episodes, pictures, args.seed)
    previous = {}
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json")) as f:
            previous = json.load(f)
    metrics = {**{k: previous[k] for k in ("train_minutes", "epochs") if k in previous}, **metrics}
    data.atomic_write_text(json.dumps(metrics, indent=2), os.path.join(run_dir, "metrics.json"))
    return metrics


def main(argv=None):
    """evaluate.py's command line: re-evaluate a run folder, optionally on other data."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder written by train.py (runs/<name>)")
    p.add_argument("--data", default=None, help="evaluate on another source with the same classes")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ood-classes", default=None, help="override the run's held-out classes")
    p.add_argument("--ood-data", default=None, help="a folder of OOD images (any layout)")
    p.add_argument("--k", type=int, default=50, help="neighbour for the k-NN OOD score (Sun et al.: 50)")
    p.add_argument("--episodes", type=int, default=200, help="few-shot episodes (at least 100)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-pictures", action="store_true", help="metrics only")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("data", a.data), ("data_root", a.data_root), ("ood_classes", a.ood_classes))
                 if v is not None}
    m = evaluate_run(a.run, overrides, a.ood_data, a.device, a.k, a.episodes, not a.no_pictures)
    print(f"test accuracy {m['test_accuracy']:.4f} (k-NN {m['knn_accuracy']:.4f})")
    for set_name, scores in m["ood"].items():
        print(f"OOD {set_name}: " + ", ".join(f"{s} AUROC {v['auroc']:.4f}" for s, v in scores.items()))
    for name, v in (m.get("few_shot") or {}).items():
        if v:
            print(f"{name} ({v['ways']}-way): prototype {v['prototype']['mean']:.4f} ± {v['prototype']['ci95']:.4f}, "
                  f"nearest neighbour {v['nearest_neighbour']['mean']:.4f} ± {v['nearest_neighbour']['ci95']:.4f}")
    print(f"wrote {os.path.join(a.run, 'metrics.json')}" + ("" if a.no_pictures else f" and {os.path.join(a.run, 'report.md')}"))


if __name__ == "__main__":
    main()
