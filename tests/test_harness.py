"""A fair experiment harness: the same optimiser steps and labelled batches with and without
negatives, the k-NN reference set is the real training images, a seed gives the same run with a
cold or a warm synthetic cache, strength means the same noise in both generators, and the
nearness meter measures what it claims on cases whose answer is known."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import dafusion
import data
import evaluate
import supcon
import train
from helpers import assert_same_weights

SMALL = ["--examples-per-class", "6", "--batch-size", "16", "--linear-epochs", "2",
         "--device", "cpu", "--no-report"]
GENERATE = ["--per-image", "1", "--ddpm-steps", "2"]


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """ID (0.2) and near-OOD (0.5, 0.9) variations of the digits few-shot set of SMALL."""
    out = str(tmp_path_factory.mktemp("syn") / "set")
    dafusion.main(["--out", out, "--examples-per-class", "6", "--strengths", "0.5,0.9"] + GENERATE)
    return out


def test_every_setting_takes_the_steps_asked_for(synthetic_set, tmp_path):
    runs = {"real": [], "id": ["--positives", "id"],
            "id+negatives": ["--positives", "id", "--negatives", "near_ood", "--negative-mode",
                             "denominators"]}  # negatives on top of every batch
    for name, flags in runs.items():
        extra = ["--synthetic", synthetic_set] if flags else []
        result = train.main(SMALL + flags + extra + ["--train-steps", "7", "--out", str(tmp_path),
                                                     "--name", name])
        assert result["optimizer_steps"] == 7, name
        log = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert json.loads(log[-1])["optimizer_steps"] == 7, name


def test_negatives_ride_on_top_of_the_same_labelled_batches():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (230,), generator=g)
    without = torch.zeros(230, dtype=torch.bool)
    without[150:] = True  # 150 labelled; the rest are not part of the run
    labelled_only = data.contrastive_batches(labels[:150], without[:150], 32, 4, 0.25,
                                             data.epoch_generator(3, 2))
    with_negatives = data.contrastive_batches(labels, without, 32, 4, 0.25,
                                              data.epoch_generator(3, 2))
    assert len(labelled_only) == len(with_negatives)
    for a, b in zip(labelled_only, with_negatives):
        assert torch.equal(a, b[:len(a)])  # the labelled part is the same batch
        assert len(b) - len(a) == 8 and without[b[len(a):]].all()  # 0.25 x 32 negatives on top
    for size in (2, 5, 32, 200):  # the count the schedule uses is the count drawn
        for m in (2, 4):
            n = data.count_contrastive_batches(labels, without, size, m)
            assert n == len(data.contrastive_batches(labels, without, size, m, 0.25, g))


def brute_force_knn_auroc(train_f, test_f, ood_f, k, rounding=1e-5):
    """Sun et al.'s score from its definition (minus the k-th smallest distance, normalised), in
    float64; and the share of (ID, OOD) pairs whose scores lie closer than `rounding`, the pairs a
    float32 distance matrix may order either way (each moves the AUROC by 1 / pairs)."""
    def score(x):
        x, t = x.double(), train_f.double()
        x, t = x / x.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
        return torch.tensor([-sorted(((row - t).norm(dim=1)).tolist())[k - 1] for row in x])
    s_in, s_out = score(test_f), score(ood_f)
    auroc = roc_auc_score([1] * len(s_in) + [0] * len(s_out), torch.cat([s_in, s_out]).numpy())
    near = float(((s_in[:, None] - s_out[None, :]).abs() < rounding).double().mean())
    return auroc, near


def test_the_knn_reference_set_is_the_real_training_images(synthetic_set, tmp_path):
    result = train.main(SMALL + ["--positives", "id", "--synthetic", synthetic_set, "--epochs",
                                 "1", "--out", str(tmp_path), "--name", "id"])
    splits = data.load_data("digits", examples_per_class=6)
    state = torch.load(tmp_path / "id" / "model.pt", weights_only=True)
    model, _ = supcon.build_model("cnn", "supcon", 1, 16, 8)
    model.load_state_dict(state["model"])
    f = lambda s: evaluate.extract_features(model, s.images, state["mean"], state["std"],  # noqa
                                            torch.device("cpu"))
    train_f, test_f, ood_f = f(splits.train), f(splits.test), f(splits.ood_test)
    assert len(train_f) == 48  # 6 x 8 real images, though the run trained on 96 with ID
    for k, key in ((50, "ood_auroc_knn"), (1, "ood_auroc_knn1")):
        expected, near = brute_force_knn_auroc(train_f, test_f, ood_f, min(k, len(train_f)))
        assert near < 1e-3  # near-ties are rare: the bound below stays tight
        assert abs(result[key] - expected) <= near + 1e-9, key


def test_a_cold_and_a_warm_synthetic_cache_train_the_same_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the cache .cache/dafusion starts empty here
    # denominators: the cached near-OOD images reach the weights
    argv = SMALL + GENERATE + ["--positives", "id", "--negatives", "near_ood", "--negative-mode",
                               "denominators", "--epochs", "1",
                               "--out", str(tmp_path / "runs")]
    train.main(argv + ["--name", "cold"])
    assert "generated" in capsys.readouterr().out
    train.main(argv + ["--name", "warm"])
    assert "reused from the cache" in capsys.readouterr().out
    assert_same_weights(tmp_path / "runs" / "cold", tmp_path / "runs" / "warm")


def sd_v1_alpha_bar(strength, steps=50):
    """Where diffusers' Stable Diffusion v1 img2img starts, from diffusers itself: its scheduler
    config (scaled-linear betas, steps_offset 1) and the pipeline's get_timesteps."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    return float(scheduler.alphas_cumprod[timesteps[0]])


@pytest.mark.parametrize("strength", [0.2, 0.5, 0.8])
def test_ddpm_strength_starts_from_sd_v1s_noise_level(strength):
    alpha_bar = dafusion.ddpm_alpha_bar()
    start = dafusion.ddpm_start(strength, alpha_bar)
    assert float(alpha_bar[start]) == pytest.approx(sd_v1_alpha_bar(strength), abs=0.005)
    if strength == 0.5:  # the reference values: SD v1 at 0.5 starts from alpha-bar 0.302
        assert sd_v1_alpha_bar(0.5) == pytest.approx(0.302, abs=0.001)
        assert float(alpha_bar[450]) > 0.55  # where the old mapping started (20 DDIM steps)


def test_nearness_rows_on_cases_whose_answer_is_known():
    g = torch.Generator().manual_seed(0)
    train_f = torch.randn(40, 6, generator=g)
    train_f[:, 3:] = 0  # training embeddings span the first three dimensions only
    test_f = train_f[:20] + 0.01 * torch.randn(20, 6, generator=g)  # ID: near the training set
    test_logits = torch.randn(20, 3, generator=g)

    def scores(f, logits):
        return {"k-NN": evaluate.knn_score(train_f, test_f if f is None else f, 5),
                "MSP": evaluate.msp_score(test_logits if logits is None else logits)}

    far = torch.zeros(15, 6)
    far[:, 3:] = torch.rand(15, 3, generator=g) + 0.1  # orthogonal to every training embedding
    labels = torch.tensor([0, 1, 2] * 5)
    right = torch.nn.functional.one_hot(labels, 3).float() * 5  # classified as the source class
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 5
    rows = evaluate.nearness_rows(train_f, scores, [
        ("id", 0.2, test_f.clone(), test_logits.clone(), test_logits.argmax(1)),
        ("near_ood", 0.9, far, wrong, labels), ("near_ood", 0.5, far, right, labels)])
    assert rows[0]["ood_auroc"] == pytest.approx(0.5) and rows[0]["source_accuracy"] == 1.0
    assert rows[1]["ood_auroc"] == 1.0 and rows[1]["source_accuracy"] == 0.0
    assert rows[2]["source_accuracy"] == 1.0 and rows[2]["images"] == 15


def test_nearness_meter_on_a_set(synthetic_set, capsys):
    result = evaluate.main(["--nearness", synthetic_set, "--examples-per-class", "6",
                            "--reference-epochs", "2"])
    saved = json.loads(open(os.path.join(synthetic_set, "nearness.json")).read())
    assert saved == json.loads(json.dumps(result))
    assert [(r["kind"], r["strength"]) for r in saved["rows"]] == [("id", 0.2), ("near_ood", 0.5),
                                                                   ("near_ood", 0.9)]
    for row in saved["rows"]:
        assert row["images"] == 48 and 0 <= row["source_accuracy"] <= 1
        assert 0 <= row["ood_auroc"] <= 1
    assert saved["held_out"]["classes"] == ["8", "9"] and 0 <= saved["held_out"]["ood_auroc"] <= 1
    assert "| near-OOD | 0.9 | 48 |" in capsys.readouterr().out


def test_outlier_exposure_flattens_the_probes_softmax_on_outliers():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    labels = torch.arange(3).repeat(40)
    features = centres[labels] + torch.randn(120, 8, generator=g)
    outliers = torch.randn(60, 8, generator=g) + 6  # a region of their own, no class
    settings = argparse.Namespace(linear_epochs=30, outlier_exposure=0.0)
    plain = train.train_linear(settings, features, labels, 3, torch.device("cpu"), 0)
    settings.outlier_exposure = 0.5
    exposed = train.train_linear(settings, features, labels, 3, torch.device("cpu"), 0, outliers)
    with torch.no_grad():
        msp = lambda probe, x: probe(x).softmax(1).max(1).values.mean().item()  # noqa: E731
        assert msp(exposed, outliers) < msp(plain, outliers) - 0.05
        # and it still classifies the labelled images, if at some cost (3 classes: chance 1/3)
        assert (exposed(features).argmax(1) == labels).float().mean() > 0.6
