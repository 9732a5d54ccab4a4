"""
dafusion.py -- DA-Fusion augmentations (Trabucco et al. 2023): in-distribution (ID) variations of
each real training image that act as extra positives, and near-out-of-distribution (near-OOD)
variations that act only as hard negatives (the thesis's re-engineered SupCon loss, supcon.py).

One augmentation procedure, SDEdit (Meng et al. 2022), as DA-Fusion uses it: noise a real image to
timestep t0 * T (t0 = "strength"), then denoise it conditioned on its class. Low strength
(--id-strength, 0.2 in the thesis) stays close to the source: ID. High strength (--ood-strength,
0.5) drifts away: near-OOD. Two generators run it:

  --generator ddpm              (default, offline) a small class-conditional DDPM (diffusers'
                                UNet2DModel with class embeddings and a null class for
                                classifier-free guidance), trained here on the training split,
                                saved to OUT/ddpm and reused.
  --generator stable-diffusion  DA-Fusion proper on a Stable Diffusion v1.x model you bring
                                (--model HUB_ID_OR_FOLDER, from your cache or a folder; nothing is
                                downloaded): textual inversion learns a token per class (only the new
                                embedding rows train; every other row is restored after each step),
                                then img2img with "a photo of a <class token>". --mode txt2img
                                generates from the class name alone; --masks DIR inpaints inside the
                                dilated object mask.

Output: OUT/{id,near_ood}/<class>/<source-stem>_<m>.png, OUT/manifest.csv (path, label, kind,
source, strength, seed, generator; what data.py reads) and OUT/contact_sheet.png. Re-running resumes:
finished images are kept, each file is written under a temporary name and renamed, and the
manifest is rewritten (atomically) after every batch to list exactly the files on disk.

Run:  python dafusion.py --out synthetic/digits                     # ddpm on sklearn's digits
      python dafusion.py --data PATH --generator stable-diffusion --model CompVis/stable-diffusion-v1-4 \\
             --out synthetic/parts --image-size 512
      python train.py --synthetic synthetic/digits --positives id --negatives near_ood
      torchrun --nproc_per_node=4 dafusion.py ...   # 4 processes (GPUs) share the images
"""

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

import data

MANIFEST_FIELDS = ("path", "label", "kind", "source", "strength", "seed", "generator")


class GenerationError(ValueError):
    """Bad arguments or a missing model: the message says what to do."""


# -----------------------------------------------------------------------------
# The plan: which images to make, where they go, with which seed


@dataclass
class Job:
    """One image to generate: source index, class, kind, m, strength, seed, output path, source name."""
    index: int  # row of the real training set it varies
    label: int
    kind: str  # "id" or "near_ood"
    m: int  # which of the M variations
    strength: float
    seed: int
    path: str  # relative to OUT
    source: str


def safe_name(text):
    """A string usable as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def plan_jobs(train_set, per_image, id_strength, ood_strength, seed, kinds=("id", "near_ood")):
    """Every (image, kind, m) to generate. Seeds depend only on (seed, image, kind, m), so an image
    is the same whether it is made in one run, in another batch, or after a resume."""
    strengths = {"id": id_strength, "near_ood": ood_strength}  # t0 of SDEdit per kind
    stems, jobs = {}, []  # (class, file stem) -> count; the plan
    for i, name in enumerate(train_set.names or [f"{i:05d}" for i in range(len(train_set))]):
        stem = safe_name(os.path.splitext(os.path.basename(name))[0])
        label = int(train_set.labels[i])  # a variation keeps its source's class
        key = (label, stem)
        stems[key] = stems.get(key, 0) + 1
        if stems[key] > 1:  # two sources with one stem in a class: keep both apart
            stem = f"{stem}-{stems[key]}"
        for kind in kinds:
            for m in range(per_image):
                # a seed per image from (run seed, source, kind, variation): hashing, not a shared
                # stream, so an image's seed does not depend on which images were made before it
                job_seed = int.from_bytes(hashlib.sha256(f"{seed}/{i}/{kind}/{m}".encode()).digest()[:4], "little")
                jobs.append(Job(i, label, kind, m, strengths[kind], job_seed,
                                f"{kind}/{safe_name(train_set.classes[label])}/{stem}_{m}.png", name))
    return jobs


def is_valid_image(path):
    """True if the file exists and decodes completely (a resume keeps it)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:
        return False


def save_image_atomic(image, path):
    """Save a PIL image under a temporary name, then rename it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"  # written whole, then renamed
    image.save(tmp)
    os.replace(tmp, path)


def write_manifest(out, jobs, classes, generator_name):
    """manifest.csv listing exactly the planned images that exist on disk (atomic rewrite)."""
    tmp = os.path.join(out, "manifest.csv.tmp")  # the manifest appears complete or not at all
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for job in jobs:
            if os.path.exists(os.path.join(out, job.path)):
                writer.writerow([job.path, classes[job.label], job.kind, job.source,
                                 job.strength, job.seed, generator_name])
    os.replace(tmp, os.path.join(out, "manifest.csv"))


def check_strength(value, name):
    """Refuse a strength outside (0, 1] with a message naming the argument."""
    if not 0 < value <= 1:
        raise GenerationError(f"{name} must be in (0, 1] (the share of the diffusion to re-run); got {value}")


def run_jobs(out, jobs, classes, generator_name, make_images, batch_size):
    """Generate the jobs whose file is missing (or unreadable), batch by batch, same strength per
    batch; save each image atomically and rewrite the manifest after every batch."""
    todo = [j for j in jobs if not is_valid_image(os.path.join(out, j.path))]  # resume: skip finished images
    missing = len(todo)  # returned: how many images this call had to make
    if missing < len(jobs):
        print(f"resuming: {len(jobs) - missing} of {len(jobs)} images already in {out}")
    # under torchrun every process takes every world-th missing image; rank 0 alone writes the
    # manifest, which lists whatever is on disk, so the ranks' images end up in one manifest
    rank, world = data.distributed()
    data.barrier()  # every rank has listed the missing images before any rank writes one
    todo = todo[rank::world]  # every rank takes every world-th job

    def update_manifest():
        if rank == 0:
            write_manifest(out, jobs, classes, generator_name)

    update_manifest()  # first, list what an earlier run left
    try:
        with tqdm(total=len(todo), desc="generate", dynamic_ncols=True, disable=None if rank == 0 else True) as bar:
            for strength in sorted({j.strength for j in todo}):
                same = [j for j in todo if j.strength == strength]  # one strength per pipeline call
                for start in range(0, len(same), batch_size):
                    batch = same[start:start + batch_size]  # up to batch_size jobs, one call
                    for job, image in zip(batch, make_images(batch)):
                        save_image_atomic(image, os.path.join(out, job.path))
                    update_manifest()  # a stop now loses at most the batch being made
                    bar.update(len(batch))
    finally:  # also on Ctrl-C or an error: the manifest lists exactly the files on disk
        update_manifest()
    return missing


# -----------------------------------------------------------------------------
# Generator 1: a small class-conditional DDPM, trained here (offline default)


def build_ddpm_unet(channels, image_size, num_classes):
    """UNet2DModel with class embeddings; class id num_classes is the null class (CFG)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_classes + 1, norm_num_groups=8)


def train_ddpm(images, labels, num_classes, folder, steps=400, batch_size=64, lr=2e-3, seed=0,
               device="cpu", null_share=0.1):
    """Train (or load from `folder`) the class-conditional DDPM on uint8 images (N, C, H, W).

    Standard epsilon-prediction objective (Ho et al. 2020) on images scaled to [-1, 1]; a share
    `null_share` of the labels is replaced by the null class so one network learns both the
    conditional and the unconditional model (Ho & Salimans 2022, classifier-free guidance).
    """
    from diffusers import DDPMScheduler, UNet2DModel
    meta = {"classes": num_classes, "shape": list(images.shape[1:]), "steps": steps, "seed": seed}  # cache key
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)
        if saved != meta:  # never reuse a model trained on other data or settings
            raise GenerationError(f"{folder} holds a DDPM trained with other settings ({saved}); "
                                  f"delete that folder or pick another --out")
        print(f"reusing the DDPM in {folder}")
        return UNet2DModel.from_pretrained(os.path.join(folder, "unet"), low_cpu_mem_usage=False).to(device).eval()
    torch.manual_seed(seed)  # the UNet's initial weights
    g = torch.Generator().manual_seed(seed)  # batches, noise and timesteps
    unet = build_ddpm_unet(images.shape[1], images.shape[2], num_classes).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")  # cosine schedule
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)  # short run
    x_all = images.float().div(127.5).sub(1).to(device)  # (N, C, H, W) in [-1, 1]
    y_all = labels.to(device)  # (N,) class of every training image
    for _ in tqdm(range(steps), desc="train ddpm", dynamic_ncols=True, disable=None):
        idx = torch.randint(len(x_all), (batch_size,), generator=g).to(device)  # (B,) a random batch
        x0, y = x_all[idx], y_all[idx].clone()  # (B, C, H, W), (B,)
        y[torch.rand(batch_size, generator=g).to(device) < null_share] = num_classes  # null class
        noise = torch.randn(x0.shape, generator=g).to(device)  # epsilon ~ N(0, I)
        t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)  # (B,) random timesteps
        # || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, y) ||^2   (Ho et al. 2020, Eq. 14)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    tmp = folder + ".tmp"  # saved beside, then swapped in
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(os.path.join(tmp, "unet"))  # diffusers' folder layout
    with open(os.path.join(tmp, "meta.json"), "w") as f:  # what it was trained on, checked on reuse
        json.dump(meta, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the saved model appears whole or not at all
    return unet.eval()


@torch.no_grad()
def sdedit(unet, sources, labels, strength, guidance, seeds, num_classes, steps=20):
    """SDEdit with the DDPM: noise uint8 sources (B, C, H, W) to timestep strength * T, then
    denoise with DDIM (deterministic given the noise) and classifier-free guidance
        eps = eps(x, null) + guidance * (eps(x, class) - eps(x, null)).
    strength 0 returns the sources; each image's noise comes from its own seed."""
    from diffusers import DDIMScheduler
    if strength == 0:
        return sources.clone()
    device = next(unet.parameters()).device  # generate where the model lives
    # DDIM over the same noise schedule the DDPM was trained with; clip x0 to the image range
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True)
    scheduler.set_timesteps(steps)
    n = max(1, int(round(strength * steps)))  # how many of the `steps` denoising steps to re-run
    timesteps = scheduler.timesteps[steps - n:]  # from t0 = strength * T down to 0
    x0 = sources.float().div(127.5).sub(1).to(device)  # (B, C, H, W) in [-1, 1]
    # each image's noise from its own seed: the same image whatever batch it is made in
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device)
    x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))  # (B, C, H, W) at t0
    y = labels.to(device)  # (B,) the class to denoise towards
    null = torch.full_like(y, num_classes)  # (B,) the null class: the unconditional model
    for t in timesteps:  # from t0 down to 0
        if guidance == 1.0:
            eps = unet(x, t, class_labels=y).sample  # no guidance: one pass
        else:
            eps_cond = unet(x, t, class_labels=y).sample  # two passes: cheaper than one of 2B on CPU
            eps_null = unet(x, t, class_labels=null).sample
            eps = eps_null + guidance * (eps_cond - eps_null)  # classifier-free guidance
        x = scheduler.step(eps, t, x).prev_sample  # (B, C, H, W) one step less noisy
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # back to uint8 pixels


def to_pil(image):
    """(C, H, W) uint8 -> PIL (L or RGB)."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C) as PIL expects
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


# -----------------------------------------------------------------------------
# Generator 2: Stable Diffusion (DA-Fusion proper)


def load_sd_pipeline(model, device, dtype):
    """StableDiffusionImg2ImgPipeline from a local folder or the local Hugging Face cache only.
    Never downloads: a model that is not here fails at once with what to do."""
    from diffusers import StableDiffusionImg2ImgPipeline
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            model, dtype=dtype, local_files_only=True, safety_checker=None,
            requires_safety_checker=False)
    except Exception as error:
        where = "folder" if os.path.isdir(model) else "Hugging Face cache"
        raise GenerationError(
            f"--model {model}: could not load a Stable Diffusion pipeline from the {where} "
            f"({type(error).__name__}: {str(error)[:200]}). Nothing is downloaded here: fetch the model "
            f"once with network access (e.g. `huggingface-cli download {model}`), or pass a local folder "
            f"in diffusers' save_pretrained layout.") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def placeholder_tokens(token, num_vectors):
    """diffusers' multi-vector convention: "<tok>", "<tok>_1", ..., "<tok>_{n-1}"."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def textual_inversion(pipe, images, token, *, num_vectors=4, init_token="a", steps=1000, lr=5e-4,
                      batch_size=4, template="a photo of a {}", seed=0):
    """Learn `num_vectors` new token embeddings for one class on a frozen pipeline (Gal et al. 2023).

    images: (N, 3, R, R) float in [-1, 1] at the pipeline's resolution. Only the new rows of the
    token-embedding matrix train: Adam's update touches the whole matrix (weight decay, moments),
    so every other row is copied back after each step -- otherwise all rows drift.
    Returns (embeddings (num_vectors, dim), losses per step).
    """
    from diffusers import DDPMScheduler
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae  # shared
    device = unet.device  # textual inversion runs where the pipeline is
    tokens = placeholder_tokens(token, num_vectors)  # num_vectors new words, one embedding row each
    if tokenizer.add_tokens(tokens) != num_vectors:
        raise GenerationError(f"token {token} already exists in the tokenizer; choose another name")
    init_ids = tokenizer.encode(init_token, add_special_tokens=False)  # the word the new rows start from
    if len(init_ids) != 1:
        raise GenerationError(f"--init-token {init_token!r} is {len(init_ids)} tokens; it must be one token")
    token_ids = tokenizer.convert_tokens_to_ids(tokens)  # (num_vectors,) their rows in the matrix
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # (V + num_vectors, dim)
    # a fresh Parameter: the resize may swap the tensor under the old one, which autograd then
    # still believes has the old number of rows
    embedding_layer = text_encoder.get_input_embeddings()
    # a fresh Parameter: the optimiser holds exactly this matrix, and nothing else shares it
    embedding_layer.weight = torch.nn.Parameter(embedding_layer.weight.detach().clone())
    embeddings = embedding_layer.weight  # (V, dim)
    with torch.no_grad():
        embeddings[token_ids] = embeddings[init_ids[0]].clone()  # start from the initializer word
    frozen_rows = embeddings.detach().clone()  # what every other row must stay
    # (V,) True = a row that must not change
    keep = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
    keep[token_ids] = False

    # only the embedding matrix trains; the UNet, the VAE and the rest of the text encoder are frozen
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    embeddings.requires_grad_(True)
    text_encoder.train()  # as diffusers' textual-inversion example (CLIP has no dropout by default)
    opt = torch.optim.AdamW([embeddings], lr=lr, weight_decay=1e-2)  # only the embedding matrix
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule of this model
    prompt = template.format(" ".join(tokens))  # e.g. "a photo of a <tok> <tok>_1 <tok>_2 <tok>_3"
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)  # (1, 77)
    g = torch.Generator().manual_seed(seed)  # image choice, noise and timesteps
    losses = []  # one per step, returned for the log
    for _ in tqdm(range(steps), desc=f"textual inversion {token}", dynamic_ncols=True, disable=None):
        x = images[torch.randint(len(images), (batch_size,), generator=g)].to(device, vae.dtype)  # (B, 3, R, R)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor  # (B, 4, R/8, R/8)
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)  # epsilon ~ N(0, I)
        # (B,) random timesteps
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=g).to(device)
        hidden = text_encoder(ids.repeat(batch_size, 1))[0]  # (B, 77, dim)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden).sample  # (B, 4, R/8, R/8)
        # what the UNet was trained to predict: the noise (v1) or the velocity (v-prediction models)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" \
            else noise_scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(pred.float(), target.float())  # the diffusion loss; gradients reach only the embeddings
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # restore every row but the placeholders, bit for bit
            embeddings[keep] = frozen_rows[keep]
        losses.append(loss.item())
    embeddings.requires_grad_(False)
    text_encoder.eval()
    return embeddings[token_ids].detach().clone(), losses


def save_embedding(path, token, vectors):
    """safetensors {token: (n, dim)}, the single-key format diffusers' load_textual_inversion reads."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({token: vectors.float().cpu().contiguous()}, tmp)  # fp32 on disk whatever the pipeline's dtype
    os.replace(tmp, path)


def pipeline_images(train_set, index, resolution, resize):
    """Real images at the pipeline's resolution as RGB PIL: reread from their files when the data
    came from a folder (full detail), else upscaled from memory."""
    out = []
    for i in index:
        name = train_set.names[i] if train_set.names else ""
        if os.path.isfile(name):
            tensor = data.open_image(name, 3, resolution, resize)
        else:
            tensor = train_set.images[i].expand(3, -1, -1) if train_set.images.shape[1] == 1 else train_set.images[i]
            tensor = F.interpolate(tensor[None].float(), size=(resolution, resolution), mode="bicubic",
                                   align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        out.append(to_pil(tensor).convert("RGB"))
    return out


def load_mask(masks_dir, source, resolution, dilate=15):
    """The object mask of a source image (white = object), dilated, at the pipeline's resolution."""
    stem = os.path.splitext(os.path.basename(source))[0]  # masks are named after their image
    path = os.path.join(masks_dir, stem + ".png")
    if not os.path.exists(path):
        raise GenerationError(f"{path}: no mask for {source}; --masks DIR needs DIR/<image stem>.png")
    with Image.open(path) as mask:
        mask = mask.convert("L").resize((resolution, resolution), Image.NEAREST)  # NEAREST: stays a 0/255 mask
    return mask.filter(ImageFilter.MaxFilter(dilate))  # dilated: the repainted region covers the object's edge


def sd_generator(args, train_set, out, device):
    """Set up DA-Fusion on Stable Diffusion; returns make_images(batch of jobs) -> list of PIL."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or
                                                                                   ("fp16" if device.type == "cuda" else "fp32")]
    pipe = load_sd_pipeline(args.model, device, dtype)  # fails at once if the model is not on disk
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor  # 512 for SD v1.x
    classes = train_set.classes
    prompts = {}  # class id -> prompt
    if args.mode == "txt2img":
        prompts = {c: args.prompt.format(name) for c, name in enumerate(classes)}  # the class name
    else:
        # one learned token per class, trained once and reused from OUT/embeddings/
        for c, name in enumerate(classes):
            token = f"<{safe_name(name)}>"
            path = os.path.join(out, "embeddings", f"{safe_name(name)}.safetensors")
            if os.path.exists(path):
                print(f"reusing the learned token {token} from {path}")
            else:
                index = torch.nonzero(train_set.labels == c).squeeze(1).tolist()  # the real images of class c
                # PIL RGB at the pipeline's resolution
                real = pipeline_images(train_set, index, resolution, args.resize)
                x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in real])
                x = x.float() / 127.5 - 1  # (N, 3, R, R) in [-1, 1]
                vectors, losses = textual_inversion(
                    pipe, x, f"<ti-{safe_name(name)}>", num_vectors=args.num_vectors,
                    init_token=args.init_token, steps=args.ti_steps, lr=args.ti_lr,
                    batch_size=args.ti_batch, template=args.prompt, seed=args.seed + c)
                save_embedding(path, token, vectors)
                print(f"{token}: textual inversion loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
            pipe.load_textual_inversion(path, token=token)  # the same loader a user of diffusers would call
            prompts[c] = args.prompt.format(token)  # the pipeline expands <tok> to its n vectors
    if args.compile:  # after textual inversion, which trains through the eager UNet
        pipe.unet = torch.compile(pipe.unet)
    if args.mode == "txt2img":
        from diffusers import StableDiffusionPipeline
        runner = StableDiffusionPipeline(**pipe.components)  # shares the weights: no second copy in memory
    elif args.masks:
        from diffusers import StableDiffusionInpaintPipeline
        runner = StableDiffusionInpaintPipeline(**pipe.components)  # shares the weights too
    else:
        runner = pipe  # img2img: DA-Fusion's own mode
    runner.set_progress_bar_config(disable=True)

    def make_images(jobs):
        kwargs = dict(prompt=[prompts[j.label] for j in jobs], guidance_scale=args.guidance,
                      num_inference_steps=args.steps,
                      # one per image: batch-independent
                      generator=[torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs],
                      output_type="pil")
        if args.mode == "txt2img":
            kwargs.update(height=resolution, width=resolution)
        else:
            kwargs.update(image=pipeline_images(train_set, [j.index for j in jobs], resolution, args.resize),
                          strength=jobs[0].strength)  # run_jobs batches one strength at a time
            if args.masks:
                kwargs["mask_image"] = [load_mask(args.masks, j.source, resolution) for j in jobs]
                kwargs.update(height=resolution, width=resolution)
        return runner(**kwargs).images  # len(jobs) PIL images, in job order

    make_images.pipeline = runner  # for benchmarks/bench_generate.py
    return make_images, f"stable-diffusion:{args.model}"


# -----------------------------------------------------------------------------
# The contact sheet: real | ID variations | near-OOD variations


def contact_sheet(out, jobs, train_set, per_class=2, path=None):
    """A picture a person can check: for a few images per class, the real image, its ID variations
    and its near-OOD variations side by side."""
    import evaluate  # its figure helpers (imported here: evaluate is not needed to generate)
    plt = evaluate.pyplot()
    by_source = {}  # source index -> kind -> its jobs
    for j in jobs:
        by_source.setdefault(j.index, {}).setdefault(j.kind, []).append(j)
    chosen = []  # the source images shown, per_class of each class
    for c in range(len(train_set.classes)):
        chosen += [i for i in by_source if int(train_set.labels[i]) == c][:per_class]
    if not chosen:
        return None
    M = max(len(v) for s in by_source.values() for v in s.values())  # variations per kind (--per-image)
    kinds = [k for k in ("id", "near_ood") if any(k in by_source[i] for i in chosen)]
    cols = 1 + M * len(kinds)  # real | M ID | M near-OOD
    height = len(chosen) * 0.9 + 0.6
    fig, axes = plt.subplots(len(chosen), cols, figsize=(cols * 0.9, height), squeeze=False,
                             gridspec_kw=dict(wspace=0.05, hspace=0.05))
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=0.02, left=0.06, right=0.99)
    for r, i in enumerate(chosen):
        row = [to_pil(train_set.images[i])] + [
            Image.open(os.path.join(out, j.path)) for k in kinds for j in by_source[i].get(k, [])]
        for col, ax in enumerate(axes[r]):
            ax.axis("off")
            if col < len(row):
                ax.imshow(row[col], cmap="gray" if row[col].mode == "L" else None)
        axes[r][0].text(-0.2, 0.5, train_set.classes[int(train_set.labels[i])], transform=axes[r][0].transAxes,
                        ha="right", va="center", fontsize=8)
    titles = ["real"] + [f"{'ID' if k == 'id' else 'near-OOD'} (strength {by_source[chosen[0]][k][0].strength})"
                         if m == 0 else "" for k in kinds for m in range(M)]
    for col, title in enumerate(titles):
        axes[0][col].set_title(title, fontsize=7, loc="left")
    fig.suptitle("DA-Fusion variations: real image | ID variations | near-OOD variations", fontsize=9,
                 y=1 - 0.1 / height)
    path = path or os.path.join(out, "contact_sheet.png")
    evaluate.save_figure(fig, path, dpi=110)
    return path


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    """dafusion.py's command line: data, generation and Stable Diffusion options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_arguments(p)
    add_generation_arguments(p)
    add_stable_diffusion_arguments(p)
    p.add_argument("--out", required=True, help="output folder (re-running resumes there)")
    return p


def add_generation_arguments(p):
    """The SDEdit and ddpm options (shared with train.py, which generates with the ddpm generator)."""
    g = p.add_argument_group("generation (DA-Fusion)")
    g.add_argument("--id-strength", type=float, default=0.2, help="SDEdit strength of ID variations (thesis 0.2)")
    g.add_argument("--ood-strength", type=float, default=0.5, help="SDEdit strength of near-OOD variations (thesis 0.5)")
    g.add_argument("--per-image", type=int, default=4, help="variations of each kind per real image (M)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 7.5 Stable Diffusion, 2.0 ddpm)")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps of a full generation; strength s runs s x steps of them "
                        "(default 50 Stable Diffusion, 20 ddpm)")
    g.add_argument("--gen-batch-size", type=int, default=None, help="images per generation batch "
                   "(default 8 Stable Diffusion, 256 ddpm)")
    g.add_argument("--kinds", default="id,near_ood", help="which kinds to make: id, near_ood or both")
    g.add_argument("--gen-device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    d = p.add_argument_group("ddpm generator")
    d.add_argument("--ddpm-steps", type=int, default=400, help="training steps of the small DDPM")
    d.add_argument("--ddpm-batch-size", type=int, default=64, help="images per training step of the small DDPM")
    return p


def add_stable_diffusion_arguments(p):
    """The options of --generator stable-diffusion (textual inversion, img2img)."""
    s = p.add_argument_group("stable-diffusion generator")
    s.add_argument("--generator", choices=["ddpm", "stable-diffusion"], default="ddpm",
                   help="ddpm: the small offline DDPM trained here; stable-diffusion: DA-Fusion proper (needs --model)")
    s.add_argument("--model", default=None, help="Stable Diffusion v1.x: hub id in your local cache, or a folder")
    s.add_argument("--mode", choices=["img2img", "txt2img"], default="img2img",
                   help="img2img: DA-Fusion on each real image; txt2img: from the class name alone")
    s.add_argument("--prompt", default="a photo of a {}", help="prompt template; {} = class token or name")
    s.add_argument("--num-vectors", type=int, default=4, help="textual inversion: vectors per class token")
    s.add_argument("--init-token", default="a", help="textual inversion: one-token word to start from")
    s.add_argument("--ti-steps", type=int, default=1000, help="textual inversion: optimiser steps per class")
    s.add_argument("--ti-lr", type=float, default=5e-4, help="textual inversion: learning rate (AdamW)")
    s.add_argument("--ti-batch", type=int, default=4, help="textual inversion: real images per step")
    s.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's, 512 for v1.x)")
    s.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default fp16 on CUDA, fp32 elsewhere")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for generation (GPU): the first batch compiles for a "
                        "minute or two, later batches run faster (benchmarks/bench_generate.py)")
    return p


def generation_settings(args):
    """The resolved generation settings (defaults filled in per generator), validated."""
    sd = args.generator == "stable-diffusion"
    if args.guidance is None:
        args.guidance = 7.5 if sd else 2.0
    if args.steps is None:
        args.steps = 50 if sd else 20
    if args.gen_batch_size is None:
        args.gen_batch_size = 8 if sd else 256
    check_strength(args.id_strength, "--id-strength")
    check_strength(args.ood_strength, "--ood-strength")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in ("id", "near_ood") for k in kinds):
        raise GenerationError(f"--kinds must name id and/or near_ood; got {args.kinds!r}")
    if args.per_image < 1:
        raise GenerationError("--per-image must be at least 1")
    for name, strength in (("--id-strength", args.id_strength), ("--ood-strength", args.ood_strength)):
        if sd and args.mode == "img2img" and int(args.steps * strength) < 1:
            raise GenerationError(f"{name} {strength} x --steps {args.steps} runs no denoising step "
                                  f"(diffusers rounds down); raise --steps or the strength")
    if sd and not args.model:
        raise GenerationError("--generator stable-diffusion needs --model (a hub id in your cache or a folder)")
    if args.mode == "txt2img" and "near_ood" in kinds and args.generator == "stable-diffusion":
        kinds = ("id",)  # txt2img has no source image to drift from: it makes ID images only
    return kinds


def generate(args, splits=None):
    """Make the synthetic set for the training split that the data arguments describe; returns how
    many images were made now (0 when everything was already on disk). Under torchrun the ranks
    share the images; rank 0 trains the DDPM / learns the tokens first and writes the manifest."""
    kinds = generation_settings(args)  # checked settings; which kinds (id, near_ood) to make
    splits = splits or data.splits_from_args(args)  # the same split train.py will use
    train_set = splits.train  # the real images the variations are made from
    device = torch.device(args.gen_device if args.gen_device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = data.distributed()  # (0, 1) outside torchrun
    os.makedirs(args.out, exist_ok=True)
    # one job per output image: (source index, kind, strength, seed, file name), fixed by the seed,
    # so a stopped run continues where it stopped and every rank agrees on the list
    jobs = plan_jobs(train_set, args.per_image, args.id_strength, args.ood_strength, args.seed, kinds)
    t0 = time.time()
    # nothing to do when every planned image is already on disk and readable (a cache hit)
    if all(is_valid_image(os.path.join(args.out, j.path)) for j in jobs):
        data.barrier()  # all ranks agree before rank 0 rewrites the manifest
        if rank == 0:
            write_manifest(args.out, jobs, train_set.classes, args.generator)
            if not os.path.exists(os.path.join(args.out, "contact_sheet.png")):
                contact_sheet(args.out, jobs, train_set)
        data.barrier()
        print(f"all {len(jobs)} images are already in {args.out}")
        return 0
    # Barrier choreography under torchrun: rank 0 trains the DDPM (or learns the tokens) and saves
    # it while the other ranks wait at the first barrier; they pass it once rank 0 reaches the
    # matching barrier below, and then load what it saved instead of training again.
    if rank > 0:  # wait for rank 0 to train the DDPM / learn the tokens, then load them
        data.barrier()
    if args.generator == "ddpm":
        unet = train_ddpm(train_set.images, train_set.labels, len(train_set.classes),
                          os.path.join(args.out, "ddpm"), steps=args.ddpm_steps,
                          batch_size=args.ddpm_batch_size, seed=args.seed, device=device)
        K = len(train_set.classes)

        def make_images(batch):
            """A batch of jobs of one strength -> their SDEdit variations as PIL images."""
            index = torch.tensor([j.index for j in batch])  # (b,) source images of the jobs
            varied = sdedit(unet, train_set.images[index], train_set.labels[index], batch[0].strength,
                            args.guidance, [j.seed for j in batch], K, args.steps)
            return [to_pil(v) for v in varied]
        name = "ddpm"
    else:
        make_images, name = sd_generator(args, train_set, args.out, device)
    if rank == 0:  # the model is saved: release the waiting ranks
        data.barrier()
    # every rank makes its share of the missing images (run_jobs splits the jobs by rank)
    made = run_jobs(args.out, jobs, train_set.classes, name, make_images, args.gen_batch_size)
    data.barrier()  # every rank's images are on disk: rank 0 writes the final manifest
    sheet = os.path.join(args.out, "contact_sheet.png")
    if rank == 0:
        write_manifest(args.out, jobs, train_set.classes, name)
        contact_sheet(args.out, jobs, train_set, path=sheet)
    data.barrier()  # nobody reads the manifest before it is complete
    print(f"{len(jobs)} images ({', '.join(kinds)}) in {args.out} after {time.time() - t0:.0f} s; "
          f"manifest {os.path.join(args.out, 'manifest.csv')}; contact sheet {sheet}")
    return made


DATA_KEYS = ("data", "image_size", "val_fraction", "seed", "examples_per_class", "ood_classes", "resize", "masks")
GENERATION_KEYS = ("id_strength", "ood_strength", "per_image", "guidance", "steps", "ddpm_steps", "ddpm_batch_size")


def cached_synthetic_set(args, splits, cache_root=os.path.join(".cache", "dafusion")):
    """For train.py's --positives id / --negatives near_ood without --synthetic: generate both kinds
    with the ddpm generator into a cache folder keyed by the data, split, few-shot subset and
    generator settings, or reuse it when it is already there. Returns the folder."""
    settings = argparse.Namespace(**vars(args))
    settings.generator, settings.model, settings.mode, settings.kinds = "ddpm", None, "img2img", "id,near_ood"
    generation_settings(settings)  # fills the ddpm defaults in, so they are part of the key
    key = {k: getattr(settings, k) for k in DATA_KEYS + GENERATION_KEYS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    settings.out = os.path.join(cache_root, f"{safe_name(os.path.basename(str(args.data).rstrip('/')))}-{digest}")
    settings.gen_device = args.device
    made = generate(settings, splits)
    print(f"synthetic set {settings.out}: " + ("reused from the cache" if made == 0 else
                                               f"generated {made} images (cached for the next run)"))
    return settings.out


def main(argv=None):
    """Generate the synthetic set the arguments describe (torchrun: the ranks share it)."""
    args = build_parser().parse_args(argv)
    # torchrun --nproc_per_node=N dafusion.py ...: N processes share the images (one manifest)
    if args.gen_device == "auto":
        args.gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    args.gen_device = str(data.init_distributed(torch.device(args.gen_device)))
    try:
        generate(args)
    except (GenerationError, data.DataError) as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
