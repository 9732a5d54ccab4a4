"""The Stable Diffusion path in the precisions a GPU runs it in (fp16 by default on CUDA, bf16 on
request), tested on the CPU, which runs both half types: textual inversion learns finite vectors
that agree with fp32's, fully seeded; the saved vectors load into a half-precision pipeline;
img2img, txt2img and inpainting give finite images; non-finite pixels are refused, not saved."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import dafusion
import data
from test_dafusion import fixed_denoising_loss, sd_args, toy_folder  # noqa: F401 (a fixture)
from tiny_sd import build_tiny_pipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STEPS, LR = 12, 0.05  # a fixed number of textual-inversion steps, large enough to move the rows

pytestmark = pytest.mark.filterwarnings("ignore")  # diffusers warns that fp16 is slow on the CPU


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd-precision")))


def toy_images():
    """Four 16 px images of a red toy class in [-1, 1] (the tiny VAE makes 8 x 8 latents)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    images[:, 0] = 0.8
    return images


def learn(model, dtype, steps=STEPS, seed=0):
    """Textual inversion on the tiny pipeline loaded in `dtype`: (vectors, losses, pipe, start)."""
    pipe = dafusion.load_sd_pipeline(model, torch.device("cpu"), DTYPES[dtype])
    a = pipe.tokenizer.encode("a", add_special_tokens=False)[0]
    start = pipe.text_encoder.get_input_embeddings().weight[a].float().clone()  # the initializer
    vectors, losses = dafusion.textual_inversion(pipe, toy_images(), "<toy>", num_vectors=2,
                                                 steps=steps, lr=LR, batch_size=2, seed=seed)
    return vectors, losses, pipe, start


@pytest.fixture(scope="module")
def learned(tiny_model):
    return {dtype: learn(tiny_model, dtype) for dtype in DTYPES}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_textual_inversion_learns_finite_fp32_vectors_whose_loss_falls(dtype, learned, tiny_model):
    vectors, losses, pipe, start = learned[dtype]
    assert vectors.dtype == torch.float32 and bool(torch.isfinite(vectors).all())
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert pipe.unet.dtype == pipe.text_encoder.dtype == DTYPES[dtype]  # the pipeline as loaded
    # the objective on fixed latents, noise and timesteps (evaluated in fp32, where a small fall
    # is not lost in rounding) is lower with the learned rows than with the initializer's
    judge = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), torch.float32)
    judge.tokenizer.add_tokens(["<toy>", "<toy>_1"])
    judge.text_encoder.resize_token_embeddings(len(judge.tokenizer), mean_resizing=False)
    ids = judge.tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1"])
    rows = judge.text_encoder.get_input_embeddings().weight
    prompt = "a photo of a <toy> <toy>_1"
    with torch.no_grad():
        rows[ids] = vectors
    after = fixed_denoising_loss(judge, toy_images(), prompt)
    with torch.no_grad():
        rows[ids] = start
    before = fixed_denoising_loss(judge, toy_images(), prompt)
    assert after < before, (dtype, before, after)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_vectors_agree_with_fp32(dtype, learned):
    # Tolerance: a quarter of the distance fp32 training moved the rows. The half-precision runs
    # see the same images, noise and timesteps; only the UNet's and the VAE's rounding (about
    # 2^-11 relative in fp16, 2^-8 in bf16) perturbs each gradient, and AdamW's normalised steps
    # turn that into a drift of a few per cent of the distance travelled (measured: 4% fp16, 6%
    # bf16, in the note of issue 28). A run that learned nothing, diverged, or whose fp16 update
    # overflowed (the -inf of old) lands far outside it.
    reference, _, _, start = learned["fp32"]
    vectors = learned[dtype][0]
    travelled = (reference - start).norm()
    assert travelled > 0.5  # the rows really moved
    assert (vectors - reference).norm() < 0.25 * travelled, (dtype, (vectors - reference).norm(),
                                                             travelled)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_same_seed_learns_bit_identical_vectors(dtype, tiny_model):
    torch.manual_seed(123)  # the global state differs between the two runs: it must not matter
    first, losses_a, _, _ = learn(tiny_model, dtype, steps=3, seed=7)
    torch.manual_seed(456)
    second, losses_b, _, _ = learn(tiny_model, dtype, steps=3, seed=7)
    assert torch.equal(first, second) and losses_a == losses_b
    third = learn(tiny_model, dtype, steps=3, seed=8)[0]
    assert not torch.equal(first, third)  # the seed is what decides


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_saved_vectors_load_into_a_half_pipeline_with_the_prompt_embeddings_of_training(
        dtype, learned, tiny_model, tmp_path):
    vectors = learned[dtype][0]
    path = str(tmp_path / "toy.safetensors")
    dafusion.save_embedding(path, "<toy>", vectors)
    pipe = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), DTYPES[dtype])
    pipe.load_textual_inversion(path, token="<toy>")  # what a diffusers user calls
    ids = pipe.tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert rows.dtype == DTYPES[dtype] and torch.equal(rows, vectors.to(DTYPES[dtype]))
    # the prompt's embeddings in the half pipeline against training's: the fp32 text encoder
    # with the same rows. Tolerance: the dtype's rounding through CLIP's layers, 2% of the
    # embeddings' scale for bf16 (8-bit mantissa), 0.5% for fp16 (11 bits)
    train_encoder = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), torch.float32)
    train_encoder.load_textual_inversion(path, token="<toy>")
    prompt = train_encoder.maybe_convert_prompt("a photo of a <toy>", train_encoder.tokenizer)
    tokens = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        half = pipe.text_encoder(tokens)[0].float()
        full = train_encoder.text_encoder(tokens)[0]
    scale = full.abs().max()
    tolerance = {"fp16": 0.005, "bf16": 0.02}[dtype] * scale
    assert (half - full).abs().max() < tolerance, (dtype, (half - full).abs().max(), scale)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["img2img", "txt2img", "inpaint"])
def test_generation_in_half_precision_gives_finite_varied_images(dtype, mode, tiny_model, toy_folder,
                                                                tmp_path):
    extra = ["--dtype", dtype, "--guidance", "15"]  # the thesis's guidance: the largest products
    if mode == "txt2img":
        extra += ["--mode", "txt2img"]
    if mode == "inpaint":
        masks = tmp_path / "masks"
        for c in ("red", "blue"):
            os.makedirs(masks / c)
            for i in range(2):
                mask = Image.new("L", (24, 24))
                mask.paste(255, (4, 4, 14, 14))
                mask.save(masks / c / f"im{i}.png")
        extra += ["--masks", str(masks)]
    out = str(tmp_path / "syn")
    made = dafusion.generate(sd_args(out, tiny_model, toy_folder, extra + ["--per-image", "1",
                                                                          "--kinds", "id"]))
    assert made == 4
    with open(os.path.join(out, "manifest.csv"), encoding="utf-8") as f:
        paths = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    for path in paths:
        with Image.open(os.path.join(out, path)) as image:
            pixels = np.asarray(image, dtype=np.float64)
        assert pixels.std() > 1.0, path  # not a constant (a NaN image would be all black)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_inpainting_masks_stay_binary_in_half_precision(dtype, tiny_model, tmp_path):
    # the mask as dafusion hands it to the pipeline (binarised, dilated), then as the pipeline
    # prepares it in its dtype: the same 0/1 mask as in fp32, at the latents' size
    image = Image.new("RGB", (24, 24), (200, 10, 10))
    mask = Image.new("L", (24, 24))
    mask.paste(255, (6, 6, 18, 18))
    image.save(tmp_path / "im.png")
    mask.save(tmp_path / "m.png")
    os.makedirs(tmp_path / "masks")
    mask.save(tmp_path / "masks" / "im.png")
    pil_mask = dafusion.load_mask(str(tmp_path / "masks"), str(tmp_path / "im.png"), str(tmp_path),
                                  16, "crop")
    assert set(np.unique(np.asarray(pil_mask))) <= {0, 255}
    from diffusers import StableDiffusionInpaintPipeline
    prepared = {}
    for name in ("fp32", dtype):
        pipe = dafusion.load_sd_pipeline(tiny_model, torch.device("cpu"), DTYPES[name])
        runner = StableDiffusionInpaintPipeline(**pipe.components)
        tensor = runner.mask_processor.preprocess(pil_mask, height=16, width=16)
        masked = torch.zeros(1, 3, 16, 16, dtype=DTYPES[name])
        latent_mask, _ = runner.prepare_mask_latents(tensor, masked, 1, 16, 16, DTYPES[name],
                                                     torch.device("cpu"), None, False)
        assert latent_mask.dtype == DTYPES[name]
        assert set(latent_mask.unique().float().tolist()) <= {0.0, 1.0}
        prepared[name] = latent_mask.float()
    assert torch.equal(prepared["fp32"], prepared[dtype]) and prepared[dtype].sum() > 0


def test_non_finite_pixels_are_refused_in_one_line_not_saved(tiny_model, toy_folder, tmp_path,
                                                             monkeypatch):
    # what an fp16 overflow in the VAE's decoder looks like: NaN pixels; before, they were saved
    # as black images without a word
    from diffusers import AutoencoderKL
    real_decode = AutoencoderKL.decode

    def overflowing(self, z, *args, **kwargs):
        out = real_decode(self, z, *args, **kwargs)  # a tuple when return_dict=False
        (out[0] if isinstance(out, tuple) else out.sample)[0] = float("nan")  # image 0 overflows
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    out = str(tmp_path / "syn")
    with pytest.raises(dafusion.GenerationError, match="non-finite pixels.*--dtype bf16 or fp32"):
        dafusion.generate(sd_args(out, tiny_model, toy_folder, ["--per-image", "1"]))
    with open(os.path.join(out, "manifest.csv"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 1  # the header: no image of the broken batch listed
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".png") and "contact" not in f]
