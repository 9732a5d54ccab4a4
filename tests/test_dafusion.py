"""dafusion.py: textual inversion and img2img / txt2img on a tiny offline Stable Diffusion pipeline,
the ddpm generator, the manifest, resuming, and bad arguments. All offline and CPU-fast."""

import csv
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import dafusion
import data
from helpers import stop_at_image
from tiny_sd import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture
def toy_folder(tmp_path):
    """Two classes of 2 RGB images each (a red-ish and a blue-ish class)."""
    rng = np.random.default_rng(0)
    for c, colour in (("red", 0), ("blue", 2)):
        os.makedirs(tmp_path / "toy" / c)
        for i in range(2):
            a = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            a[..., colour] = 220
            Image.fromarray(a).save(tmp_path / "toy" / c / f"im{i}.png")
    return str(tmp_path / "toy")


def fixed_denoising_loss(pipe, images, prompt):
    """The textual-inversion objective on fixed latents, noise and timesteps (no sampling noise)."""
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean.repeat(4, 1, 1, 1) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(latents),), generator=g)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids.repeat(len(latents), 1))[0]
        pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        return torch.nn.functional.mse_loss(pred, noise).item()


def test_textual_inversion_trains_only_the_placeholder_rows(tiny_model):
    pipe = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    images[:, 0] = 0.8  # a red toy class
    before_rows = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    start = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.encode("a", add_special_tokens=False)[0]].clone()
    loss_before = None
    vectors, losses = dafusion.textual_inversion(pipe, images, "<toy>", num_vectors=2, steps=40, lr=0.05,
                                                 batch_size=4, seed=0)
    after_rows = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = pipe.tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1"])
    # every original row is bit-identical; the two new rows moved away from the initializer
    assert torch.equal(after_rows[: len(before_rows)], before_rows)
    assert after_rows.shape[0] == len(before_rows) + 2
    assert torch.equal(after_rows[ids], vectors) and not torch.allclose(vectors, start.expand_as(vectors))
    # the objective on fixed noise falls compared with the initializer embedding
    prompt = "a photo of a <toy> <toy>_1"
    loss_after = fixed_denoising_loss(pipe, images, prompt)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[ids] = start
    loss_before = fixed_denoising_loss(pipe, images, prompt)
    assert loss_after < loss_before, (loss_before, loss_after)
    assert len(losses) == 40 and all(np.isfinite(losses))


def test_saved_embeddings_load_back_through_diffusers(tiny_model, tmp_path):
    pipe = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), torch.float32)
    vectors = torch.randn(3, pipe.text_encoder.config.hidden_size)
    path = str(tmp_path / "emb" / "cls.safetensors")
    dafusion.save_embedding(path, "<cls>", vectors)
    assert not [f for f in os.listdir(tmp_path / "emb") if ".tmp" in f]  # no temporary left
    pipe.load_textual_inversion(path, token="<cls>")
    ids = pipe.tokenizer.convert_tokens_to_ids(dafusion.placeholder_tokens("<cls>", 3))
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)
    assert pipe.maybe_convert_prompt("a photo of a <cls>", pipe.tokenizer) == "a photo of a <cls> <cls>_1 <cls>_2"


def sd_args(out, model, data_dir, extra=()):
    return dafusion.build_parser().parse_args(
        ["--data", data_dir, "--image-size", "24", "--ood-classes", "", "--val-fraction", "0",
         "--generator", "stable-diffusion", "--model", model, "--out", out, "--per-image", "2",
         "--steps", "5", "--ti-steps", "3", "--num-vectors", "2", "--ti-batch", "2", "--gen-batch-size", "3",
         *extra])


def read_rows(out):
    with open(os.path.join(out, "manifest.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.filterwarnings("ignore")  # diffusers warns that fp16 will not run on the CPU
def test_pipeline_loads_in_the_dtype_asked_for(tiny_model):
    # fp16 on a GPU is where the generation speed comes from: a keyword diffusers ignored would
    # silently load fp32 weights (diffusers renamed torch_dtype to dtype)
    pipe = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), torch.float16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}


def test_img2img_end_to_end_with_seeds(tiny_model, toy_folder, tmp_path):
    out = str(tmp_path / "a")
    assert dafusion.generate(sd_args(out, tiny_model, toy_folder)) == 16  # 4 images x 2 kinds x 2
    rows = read_rows(out)
    assert len(rows) == 16 and {r["kind"] for r in rows} == {"id", "near_ood"}
    for r in rows:
        assert r["path"].startswith(f"{r['kind']}/{r['label']}/") and r["label"] in ("red", "blue")
        assert float(r["strength"]) == (0.2 if r["kind"] == "id" else 0.5)
        with Image.open(os.path.join(out, r["path"])) as im:
            assert im.size == (16, 16)  # the tiny pipeline: UNet sample size 8 x VAE factor 2
    assert os.path.exists(os.path.join(out, "embeddings", "red.safetensors"))
    assert os.path.exists(os.path.join(out, "contact_sheet.png"))
    # the same seed gives the same images; the learned tokens are reused, not retrained
    out_b = str(tmp_path / "b")
    os.makedirs(out_b)
    import shutil
    shutil.copytree(os.path.join(out, "embeddings"), os.path.join(out_b, "embeddings"))
    dafusion.generate(sd_args(out_b, tiny_model, toy_folder))
    for r in rows:
        a = np.asarray(Image.open(os.path.join(out, r["path"])))
        b = np.asarray(Image.open(os.path.join(out_b, r["path"])))
        assert np.array_equal(a, b), r["path"]
    # data.py reads the result: the near-OOD rows are negative-only
    splits = data.load_data(toy_folder, image_size=24, ood_classes="", val_fraction=0)
    syn = data.read_manifest(out, splits, 24, 3)
    assert int(syn.negative_only.sum()) == 8 and len(syn) == 16


def test_txt2img_makes_id_images_per_class(tiny_model, toy_folder, tmp_path):
    out = str(tmp_path / "t")
    dafusion.generate(sd_args(out, tiny_model, toy_folder, ["--mode", "txt2img"]))
    rows = read_rows(out)
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"id"}
    assert sorted(r["label"] for r in rows) == ["blue"] * 4 + ["red"] * 4
    assert not os.path.exists(os.path.join(out, "embeddings"))  # txt2img uses the class name
    # no source image and no strength: a txt2img image had neither
    assert {(r["source"], r["strength"]) for r in rows} == {("", "")}


def test_missing_model_fails_at_once(tmp_path, toy_folder):
    t0 = time.time()
    with pytest.raises(dafusion.GenerationError, match="Nothing is downloaded"):
        dafusion.generate(sd_args(str(tmp_path / "x"), "nobody/no-such-model", toy_folder))
    with pytest.raises(dafusion.GenerationError, match="folder"):
        dafusion.generate(sd_args(str(tmp_path / "x"), str(tmp_path), toy_folder))
    assert time.time() - t0 < 20


@pytest.mark.parametrize("flag,value", [("--id-strength", "0"), ("--ood-strength", "1.5"), ("--id-strength", "-0.1")])
def test_strength_outside_0_1_is_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # refused where argparse reads it, before any data
        dafusion.build_parser().parse_args(["--out", str(tmp_path), flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: {value} is not a number in (0, 1]" in capsys.readouterr().err


def test_too_few_steps_for_a_strength_is_refused(tiny_model, toy_folder, tmp_path):
    with pytest.raises(dafusion.GenerationError, match="runs no denoising step"):
        dafusion.generate(sd_args(str(tmp_path / "s"), tiny_model, toy_folder, ["--steps", "4"]))


def test_unknown_class_and_missing_sd_model_are_refused(tmp_path):
    with pytest.raises(data.DataError, match="not a class"):
        dafusion.generate(dafusion.build_parser().parse_args(["--out", str(tmp_path), "--ood-classes", "ten"]))
    with pytest.raises(dafusion.GenerationError, match="needs --model"):
        dafusion.generate(dafusion.build_parser().parse_args(["--out", str(tmp_path), "--generator", "stable-diffusion"]))


# -----------------------------------------------------------------------------
# The ddpm generator


@pytest.fixture(scope="module")
def digits_ddpm(tmp_path_factory):
    s = data.load_data("digits", examples_per_class=10, ood_classes="8,9", seed=0)
    folder = str(tmp_path_factory.mktemp("ddpm") / "ddpm")
    unet = dafusion.train_ddpm(s.train.images, s.train.labels, 8, folder, steps=60, batch_size=32)
    return s, folder, unet


def test_ddpm_saves_and_reloads(digits_ddpm, capsys):
    s, folder, unet = digits_ddpm
    again = dafusion.train_ddpm(s.train.images, s.train.labels, 8, folder, steps=60, batch_size=32)
    assert "reusing" in capsys.readouterr().out
    for (k, a), b in zip(unet.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(dafusion.GenerationError, match="other settings"):
        dafusion.train_ddpm(s.train.images, s.train.labels, 8, folder, steps=61)


def test_ddpm_variations_drift_with_strength(digits_ddpm):
    s, _, unet = digits_ddpm
    x, y = s.train.images[:40], s.train.labels[:40]
    seeds = list(range(40))
    assert torch.equal(dafusion.sdedit(unet, x, y, 0.0, 2.0, seeds, 8), x)  # strength 0: the source
    distance = []
    for strength in (0.1, 0.3, 0.6, 1.0):
        out = dafusion.sdedit(unet, x, y, strength, 2.0, seeds, 8)
        assert out.shape == x.shape and out.dtype == torch.uint8
        distance.append((out.float() - x.float()).abs().mean().item())
    assert distance == sorted(distance) and distance[0] < 0.5 * distance[-1], distance
    # the same seeds give the same images, batched or not
    one = dafusion.sdedit(unet, x[:1], y[:1], 0.5, 2.0, seeds[:1], 8)
    torch.testing.assert_close(one, dafusion.sdedit(unet, x, y, 0.5, 2.0, seeds, 8)[:1], atol=1, rtol=0)


def test_ddpm_run_resumes_after_an_interruption(tmp_path, monkeypatch):
    argv = ["--out", str(tmp_path / "syn"), "--examples-per-class", "3", "--per-image", "2",
            "--ddpm-steps", "5", "--gen-batch-size", "4"]
    real_write = stop_at_image(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        dafusion.main(argv)
    out = str(tmp_path / "syn")
    on_disk = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                     if f.endswith(".png") and "contact" not in f)
    rows = read_rows(out)
    assert len(on_disk) == 5 and sorted(r["path"] for r in rows) == [p for p in on_disk if ".tmp" not in p]
    assert not any(".tmp" in p for p in on_disk)
    monkeypatch.setattr(data, "atomic_write", real_write)
    assert dafusion.generate(dafusion.build_parser().parse_args(argv)) == 96 - 5  # 8 classes x 3 images x 2 kinds x 2, minus those on disk
    rows = read_rows(out)
    assert len(rows) == 96 and all(os.path.exists(os.path.join(out, r["path"])) for r in rows)
    # the resumed set equals an uninterrupted one
    straight = str(tmp_path / "straight")
    dafusion.main(argv[:1] + [straight] + argv[2:])
    for r in rows:
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, r["path"]))),
                              np.asarray(Image.open(os.path.join(straight, r["path"])))), r["path"]


# -----------------------------------------------------------------------------
# Inputs the Stable Diffusion path must read as the user laid them out


def test_non_ascii_class_names_get_their_own_token_and_folder(tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("螺丝", "螺母", "zero one", "zero-one"):  # two all-CJK names, two that slug alike
        os.makedirs(tmp_path / "parts" / name)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / "parts" / name / "p.png")
    out = str(tmp_path / "syn")
    dafusion.generate(sd_args(out, tiny_model, str(tmp_path / "parts"), ["--per-image", "1"]))
    rows = read_rows(out)
    assert len(rows) == 8 and len({r["path"] for r in rows}) == 8  # 4 classes x 2 kinds
    assert all(os.path.exists(os.path.join(out, r["path"])) for r in rows)
    assert len(os.listdir(os.path.join(out, "embeddings"))) == 4  # one learned token each


def test_masks_have_one_layout_for_cropping_and_inpainting(tiny_model, tmp_path):
    # an ImageFolder with a sub-folder; masks at MASKS/<path relative to --data>.png
    for c in ("red", "blue"):
        for i in range(2):
            os.makedirs(tmp_path / "parts" / c / "lot1", exist_ok=True)
            os.makedirs(tmp_path / "masks" / c / "lot1", exist_ok=True)
            Image.new("RGB", (24, 24), (200, 10, 10) if c == "red" else (10, 10, 200)).save(
                tmp_path / "parts" / c / "lot1" / f"im{i}.jpg")
            mask = Image.new("L", (24, 24))
            mask.paste(255, (6, 6, 18, 18))
            mask.save(tmp_path / "masks" / c / "lot1" / f"im{i}.png")
    parts, masks = str(tmp_path / "parts"), str(tmp_path / "masks")
    s = data.load_data(parts, image_size=24, ood_classes="", val_fraction=0, masks=masks)
    assert len(s.train) == 4  # every image found its mask and was cropped around it
    out = str(tmp_path / "syn")
    made = dafusion.generate(sd_args(out, tiny_model, parts, ["--masks", masks, "--per-image", "1"]))
    assert made == 8 and len(read_rows(out)) == 8  # inpainted inside the same masks
    os.remove(tmp_path / "masks" / "red" / "lot1" / "im1.png")
    with pytest.raises(data.DataError, match=r"masks/red/lot1/im1\.png: no mask"):
        data.load_data(parts, image_size=24, ood_classes="", val_fraction=0, masks=masks)
