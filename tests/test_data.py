"""data.py: sources, splits, the manifest reader, the batch sampler, augmentations, bad input."""

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data


def write_folder(root, classes=("ant", "bee", "cat"), per_class=6, size=12, rgb=True, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            shape = (size, size + 4, 3) if rgb else (size, size + 4)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(os.path.join(root, c, f"{i:03d}.png"))


def test_digits_default_holds_out_8_and_9():
    s = data.load_data("digits", seed=0)
    assert s.classes == [str(i) for i in range(8)] and s.ood_classes == ["8", "9"]
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (1, 16, 16)
    assert set(s.train.labels.tolist()) == set(range(8)) and set(s.ood_test.labels.tolist()) == {0, 1}
    assert len(s.train) + len(s.test) + len(s.ood_test) < 1797  # the 8/9 training images are dropped
    # the stratified split holds a quarter of every class for testing
    for c in range(8):
        n_train, n_test = (s.train.labels == c).sum().item(), (s.test.labels == c).sum().item()
        assert abs(n_test / (n_train + n_test) - 0.25) < 0.02


def test_few_shot_is_seeded_and_k_per_class():
    a = data.load_data("digits", examples_per_class=5, seed=1, ood_classes="")
    b = data.load_data("digits", examples_per_class=5, seed=1, ood_classes="")
    c = data.load_data("digits", examples_per_class=5, seed=2, ood_classes="")
    assert torch.bincount(a.train.labels).tolist() == [5] * 10 and a.ood_test is None
    assert a.train.names == b.train.names and a.train.names != c.train.names


def test_image_folder_with_train_test_and_single_folder(tmp_path):
    write_folder(tmp_path / "two" / "train")
    write_folder(tmp_path / "two" / "test", per_class=3, seed=1)
    s = data.load_data(str(tmp_path / "two"), image_size=8, ood_classes="cat")
    assert s.classes == ["ant", "bee"] and s.ood_classes == ["cat"]
    assert s.train.images.shape == (12, 3, 8, 8) and len(s.test) == 6 and len(s.ood_test) == 3
    write_folder(tmp_path / "one", rgb=False, per_class=8)
    s = data.load_data(str(tmp_path / "one"), image_size=8, val_fraction=0.25, ood_classes="")
    assert s.train.images.shape == (18, 1, 8, 8) and len(s.test) == 6  # greyscale, 2 of 8 per class


def test_letterbox_keeps_aspect_on_black():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    out = np.asarray(data.resize_pil(img, 20, "letterbox"))
    assert out.shape == (20, 20, 3)
    assert out[:4].max() == 0 and out[-4:].max() == 0 and out[10, 10].min() == 255


def test_crop_to_mask_and_synthetic_margin():
    img = Image.new("L", (100, 100))
    mask = Image.new("L", (100, 100))
    mask.paste(255, (40, 30, 60, 50))  # a 20 x 20 object
    crop, mask_crop = data.crop_to_mask(img, mask, dilation=0.5)
    assert crop.size == (40, 40) == mask_crop.size  # 20 px box, 50% more on every side
    assert np.asarray(mask_crop)[10:30, 10:30].min() == 255  # the object in the middle
    cut = data.synthetic_margin_crop(Image.new("RGB", (100, 100)), np.random.default_rng(0))
    assert cut.size[0] == 100 and 70 <= cut.size[1] <= 80


def test_bad_images_name_the_file(tmp_path):
    write_folder(tmp_path / "d")
    bad = tmp_path / "d" / "bee" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(data.DataError, match="broken.jpg.*--skip-bad-images"):
        data.load_data(str(tmp_path / "d"), image_size=8, ood_classes="")
    s = data.load_data(str(tmp_path / "d"), image_size=8, ood_classes="", skip_bad_images=True)
    assert len(s.train) + len(s.test) == 18
    # a truncated JPEG fails too
    good = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    raw = good.read_bytes()
    (tmp_path / "d" / "ant" / "half.jpg").write_bytes(raw[: len(raw) // 2])
    bad.unlink()
    with pytest.raises(data.DataError, match="half.jpg"):
        data.load_data(str(tmp_path / "d"), image_size=8, ood_classes="")


def test_empty_class_folder_and_missing_sources(tmp_path):
    write_folder(tmp_path / "d")
    os.makedirs(tmp_path / "d" / "dog")
    with pytest.raises(data.DataError, match="dog.*no images"):
        data.load_data(str(tmp_path / "d"), image_size=8)
    with pytest.raises(data.DataError, match="not a folder"):
        data.load_data(str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="--download.*--data-root"):
        data.load_data("mnist", data_root=str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="not a class"):
        data.load_data("digits", ood_classes="7,eleven")


def test_labels_out_of_range():
    with pytest.raises(data.DataError, match="label 5 is out of range for 3 classes"):
        data.ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b", "c"])


def write_manifest(folder, rows, source="", strength=0.5):
    """A manifest of flat grey images; rows: (path, label, kind) or (path, label, kind, source)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "kind", "source", "strength", "seed", "generator"])
        for path, label, kind, *src in rows:
            full = os.path.join(folder, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            Image.new("L", (10, 10), 128).save(full)
            w.writerow([path, label, kind, src[0] if src else source, strength, 0, "test"])


def splits_of(classes, train_names=(), test_names=(), ood_names=()):
    """A Splits with one tiny image per name, for the manifest reader's source checks."""
    def images(names):
        return data.ImageSet(torch.zeros(len(names), 1, 4, 4, dtype=torch.uint8),
                             torch.zeros(len(names), dtype=torch.long), list(classes),
                             names=list(names))
    return data.Splits(images(train_names), images(test_names),
                       images(ood_names) if ood_names else None, list(classes), [])


def test_manifest_reader(tmp_path):
    folder = str(tmp_path / "syn")
    write_manifest(folder, [("id/1/a_0.png", "1", "id"), ("near_ood/0/b_0.png", "0", "near_ood"),
                            ("near_ood/1/c_0.png", "1", "near_ood")])
    s = data.read_manifest(folder, splits_of(["0", "1"]), 8, 1)
    assert s.images.shape == (3, 1, 8, 8)
    assert s.labels.tolist() == [1, 0, 1] and s.negative_only.tolist() == [False, True, True]
    assert s.kind.tolist() == [data.KIND_ID, data.KIND_NEAR_OOD, data.KIND_NEAR_OOD]


def test_manifest_errors(tmp_path):
    folder = str(tmp_path / "syn")
    write_manifest(folder, [("id/7/a_0.png", "7", "id")])
    with pytest.raises(data.DataError, match="line 2: class '7' is not a class"):
        data.read_manifest(folder, splits_of(["0", "1"]), 8, 1)
    write_manifest(folder, [("id/1/a_0.png", "1", "id")])
    os.remove(os.path.join(folder, "id/1/a_0.png"))
    with pytest.raises(data.DataError, match="a_0.png does not exist"):
        data.read_manifest(folder, splits_of(["0", "1"]), 8, 1)
    with pytest.raises(data.DataError, match="no manifest.csv"):
        data.read_manifest(str(tmp_path), splits_of(["0"]), 8, 1)


def test_sampler_guarantees_positives_and_negative_share():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (300,), generator=g)
    labels[:200] = torch.arange(200) % 7  # class sizes 29 and 28: 29 = 4 * 7 + 1 leaves one over
    neg = torch.zeros(300, dtype=torch.bool)
    neg[200:] = True
    batches = data.contrastive_batches(labels, neg, batch_size=64, m_per_class=4,
                                       negatives_share=0.25, generator=data.epoch_generator(3, 1))
    seen = torch.cat([b[~neg[b]] for b in batches])
    assert sorted(seen.tolist()) == list(range(200))  # every labelled image once per epoch
    for b in batches:
        real, negative = b[~neg[b]], b[neg[b]]
        counts = torch.bincount(labels[real], minlength=7)
        assert ((counts == 0) | (counts >= 2)).all()  # every labelled image has a positive
        assert len(negative) == 16  # 25% of 64
        assert torch.isin(labels[negative], labels[real]).all()  # hard negatives of classes present
    again = data.contrastive_batches(labels, neg, 64, 4, 0.25, data.epoch_generator(3, 1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


@pytest.mark.parametrize("how", ["none", "rotation", "simclr"])
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 16), (3, 64)])
def test_augmentations_shape_and_determinism(how, channels, size):
    imgs = torch.randint(0, 256, (5, channels, size, size), dtype=torch.uint8)
    mean, std = data.channel_stats(imgs)
    a = data.augment(imgs, how, torch.Generator().manual_seed(0), mean, std)
    b = data.augment(imgs, how, torch.Generator().manual_seed(0), mean, std)
    assert a.shape == imgs.shape and torch.equal(a, b) and torch.isfinite(a).all()
    if how == "none":
        torch.testing.assert_close(a, data.to_float(imgs, mean, std))
    else:
        assert not torch.allclose(a, data.to_float(imgs, mean, std))
