"""
dafusion.py -- SDEdit from a strength (Meng et al. 2022, SDEdit, Algorithm 1): a real image x0
is noised to the timestep t that its strength s in (0, 1] picks,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),   abar_t: alpha-bar at t,
and denoised from t down to 0, conditioned on its class. Low strength stays close to the source,
high strength drifts away. This is how DA-Fusion (Trabucco et al. 2023) makes its augmentations,
and how this file does: in-distribution (ID) variations of each real training image at low
strength (--id-strength, 0.2 in the thesis), which act as extra positives, and
near-out-of-distribution (near-OOD) variations at high strength (--ood-strength, 0.5 in the
thesis; --strengths for several), which act only as hard negatives in the thesis's re-engineered
SupCon loss (supcon.py).

What strength means. Stable Diffusion v1's img2img (diffusers, 50 DDIM steps over its
scaled-linear schedule) starts at timestep t(s) = 20 int(50 s) - 19, i.e. from the noise level
alpha-bar(t(s)): 0.78 at s = 0.2, 0.30 at s = 0.5, 0.043 at s = 0.8. The ddpm generator was
trained with a cosine schedule, on which the same timestep means much less noise (SD's
s = 0.5 timestep 481 has alpha-bar 0.52 there). So it starts instead at the timestep of ITS
schedule with the alpha-bar Stable Diffusion v1 starts from: strength s means the same noise
in both generators.

  --generator ddpm              (default, offline) a small class-conditional DDPM (diffusers'
                                UNet2DModel with class embeddings and a null class for
                                classifier-free guidance), trained here on the training split,
                                saved to OUT/ddpm and reused.
  --generator stable-diffusion  DA-Fusion proper on a Stable Diffusion v1.x model you bring
                                (--model HUB_ID_OR_FOLDER, from your cache or a folder; nothing is
                                downloaded): textual inversion learns a token per class (only the
                                new embedding rows train; every other row is restored after each
                                step), then img2img with "a photo of a <class token>". --mode
                                txt2img generates from the class name alone; --masks DIR
                                inpaints inside the dilated object mask (DIR/<image path relative
                                to --data>.png, the layout data.py crops with).

Output: OUT/{id,near_ood}/<class folder>/<source>_s<strength>_<m>.png, OUT/manifest.csv (the
columns of data.MANIFEST_COLUMNS; what data.py reads) and OUT/contact_sheet.png. Class folders
and tokens are the class names where those are plain ASCII, else the name's ASCII part plus a
hash of the exact name, so two classes never share one. Re-running resumes: an image is kept
when the manifest lists it with the same source, strength, seed and generator; every file is
written whole under a temporary name and renamed; the manifest is rewritten after each batch.

Run:  python dafusion.py --out synthetic/digits                     # ddpm on sklearn's digits
      python dafusion.py --out synthetic/digits --strengths 0.3,0.5,0.7,0.9  # several near-OOD
      python dafusion.py --data PATH --generator stable-diffusion \\
             --model CompVis/stable-diffusion-v1-4 --out synthetic/parts --image-size 512
      python train.py --synthetic synthetic/digits --positives id --negatives near_ood
      torchrun --nproc_per_node=4 dafusion.py ...   # 4 processes (GPUs) share the images
"""

import contextlib
import hashlib  # stable names and seeds (Python's hash() is salted per process)
import json
import os
import re
import shlex  # the command to continue, quoted for a shell
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter  # ImageFilter.MaxFilter dilates masks
from tqdm.auto import tqdm

import data


class GenerationError(data.DataError):
    """Bad generation arguments or a missing model: the message says what to do."""


# -----------------------------------------------------------------------------
# SDEdit from a strength: start at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, denoise to 0
def sd_v1_start(strength, steps=50):
    """(timestep, alpha-bar) at which Stable Diffusion v1's img2img starts for `strength`, with
    its default 50 DDIM steps over the scaled-linear schedule (0.00085 -> 0.012, 1000 steps,
    "leading" spacing, steps_offset 1). Strengths below 1/steps count as one step."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)  # (1000,)
    ratio = 1000 // steps  # 20 for 50 steps
    timesteps = torch.arange(steps - 1, -1, -1) * ratio + 1  # [981, 961, ..., 1] for 50 steps
    n = min(max(1, int(steps * strength)), steps)  # denoising steps img2img runs
    t = int(timesteps[steps - n])  # the first of the last n timesteps
    return t, float(alpha_bar[t])


def ddpm_start(strength, alpha_bar):
    """The DDPM's first timestep for `strength`: where its own alpha-bar is closest to the
    alpha-bar Stable Diffusion v1 starts from at that strength (sd_v1_start)."""
    target = sd_v1_start(strength)[1]  # SD v1's alpha-bar at this strength
    return int((alpha_bar.double() - target).abs().argmin())  # nearest in alpha-bar, not in t


@torch.no_grad()
def sdedit(unet, sources, labels, strength, guidance, seeds, num_classes, steps=20):
    """SDEdit with the DDPM: noise uint8 sources (B, C, H, W) to the start of `strength`
    (ddpm_start), then denoise with DDIM (Song et al. 2021, eta = 0: deterministic given the
    noise) in round(strength * steps) steps, with classifier-free guidance
        eps = eps(x, null) + guidance * (eps(x, class) - eps(x, null)).
    strength 0 returns the sources; each image's noise comes from its own seed."""
    if strength == 0:
        return sources.clone()
    device = next(unet.parameters()).device
    alpha_bar = ddpm_alpha_bar().to(device)  # (1000,) the schedule the DDPM was trained with
    t0 = ddpm_start(strength, alpha_bar)
    n = max(1, int(round(strength * steps)))  # denoising steps from t0 down to 0
    timesteps = torch.linspace(t0, 0, n + 1).round().long()[:-1].tolist()  # t0 > ... > 0
    x0 = sources.float().div(127.5).sub(1).to(device)  # (B, C, H, W) in [-1, 1]
    # each image's noise from its own seed: the same image whatever batch it is made in
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device)  # drawn on the CPU: the same on any device
    x = alpha_bar[t0].sqrt() * x0 + (1 - alpha_bar[t0]).sqrt() * noise  # (B, C, H, W) at t0
    y = labels.to(device)
    null = torch.full_like(y, num_classes)  # the null class: the unconditional model
    for i, t in enumerate(timesteps):
        step = torch.full_like(y, t)  # (B,) the same t for every image
        eps = unet(x, step, class_labels=y).sample  # eps(x, class)
        if guidance != 1.0:  # two passes: cheaper than one of 2B on the CPU
            eps_null = unet(x, step, class_labels=null).sample
            eps = eps_null + guidance * (eps - eps_null)
        a_t = alpha_bar[t]
        a_next = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(a_t)
        x0_pred = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # predicted image
        x = a_next.sqrt() * x0_pred + (1 - a_next).sqrt() * eps  # DDIM step, eta = 0
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # [-1,1] -> 0..255


# -----------------------------------------------------------------------------
# Generating a set
def generate(args, splits=None, device=None):
    """Make the synthetic set for the training split the data arguments describe; returns how
    many images were made now (0 when everything was already on disk). Under torchrun the ranks
    share the images; rank 0 trains the DDPM / learns the tokens first and writes the manifest.
    Before any data loads, OUT must be writable; while the set is made, OUT is locked: a second
    process filling the same OUT (or train.py's same cache folder) waits, then reuses or
    refuses what the first made -- never mixed, never overwritten."""
    args = with_generation_defaults(args)  # guidance, steps, batch by generator
    kinds = check_generation(args)  # refuses bad settings first
    rank, _ = data.distributed()
    if rank == 0:
        data.writable_folder(args.out, "--out")  # now, not after minutes of loading
    with data.folder_lock(args.out) if rank == 0 else contextlib.nullcontext():
        return make_set(args, kinds, splits, device)


def make_set(args, kinds, splits=None, device=None):
    """generate() inside OUT's lock: plan the jobs, reuse what OUT holds, make the rest."""
    splits = splits or data.splits_from_args(args)  # the same split train.py will use
    train_set = splits.train  # the real images the variations are made from
    device = device or data.pick_device(args.gen_device)  # train.py passes its own
    rank, _ = data.distributed()
    sources = [splits.source_id(n) for n in train_set.names]  # manifest ids of the sources
    jobs = plan_jobs(train_set, sources, args.per_image, args.id_strength,
                     args.strengths or [args.ood_strength], args.seed, kinds)  # --strengths wins
    if args.generator == "stable-diffusion" and args.mode == "txt2img":
        for j in jobs:  # no source image and no strength: a txt2img row carries neither
            j.source, j.strength = "", None
    # the manifest's generator column: a set is reused only by the same generator
    name = "ddpm" if args.generator == "ddpm" else f"stable-diffusion:{args.model}"
    sheet = os.path.join(args.out, "contact_sheet.png")
    if rank == 0:
        open_output(args, jobs, sheet)  # settings checked, stale temporaries removed
    data.barrier()  # the folder is ready for every rank
    t0 = time.time()
    if len(finished_jobs(args.out, jobs, train_set.classes, name)) == len(jobs):  # a complete set
        if rank == 0 and not os.path.exists(sheet):  # a cache hit: nothing to load or train
            contact_sheet(args.out, jobs, train_set, sheet)
        print(f"all {len(jobs)} images are already in {args.out}")
        return 0
    # rank 0 trains the DDPM (or learns the tokens) and saves it while the other ranks wait at
    # this barrier; they pass it once rank 0 reaches the one below, then load what it saved
    if rank > 0:
        data.barrier()
    if args.generator == "ddpm":
        make_images = ddpm_generator(args, train_set, device)
    else:
        make_images = sd_generator(args, splits, device)
    if rank == 0:
        data.barrier()  # releases the other ranks
    made = run_jobs(args.out, jobs, train_set.classes, name, make_images, args.gen_batch_size)
    data.barrier()  # every rank's images are on disk: rank 0 lists them all
    if rank == 0:
        on_disk = [j for j in jobs if is_valid_image(os.path.join(args.out, j.path))]
        write_manifest(args.out, on_disk, train_set.classes, name)  # all ranks' images
        contact_sheet(args.out, jobs, train_set, sheet)
    data.barrier()  # nobody reads the manifest before it is complete
    print(f"{len(jobs)} images ({', '.join(kinds)}) in {args.out} after {time.time() - t0:.0f} "
          f"s; manifest {os.path.join(args.out, 'manifest.csv')}; contact sheet {sheet}")
    return made


# -----------------------------------------------------------------------------
# The plan: which images to make, where they go, with which seed
@dataclass
class Job:
    """One image to generate."""
    index: int  # row of the real training set it varies
    label: int  # its class (the source's)
    kind: str  # "id" or "near_ood"
    m: int  # which of the M variations
    strength: float  # SDEdit strength; None for txt2img, which starts from pure noise
    seed: int  # its noise: a function of (run seed, source, kind, m) alone
    path: str  # relative to OUT
    source: str  # the source image as the manifest names it (data.Splits.source_id); "" txt2img


def class_folders(classes):
    """Class name -> the folder (and token) name of its images, one-to-one: plain ASCII names
    ([A-Za-z0-9._-]) as they are; any other name, and names equal but for case (one folder on
    macOS and Windows disks), as their ASCII part + "~" + a hash of the exact name. "~" never
    occurs in a plain name, and hashes tell the others apart: no two classes share a folder."""
    plain = {name: re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) is not None
             for name in classes}  # first character not ".": no hidden folders
    lower = Counter(name.lower() for name in classes if plain[name])  # case-folded counts
    folders = {}
    for name in classes:
        if plain[name] and lower[name.lower()] == 1:  # kept as it is
            folders[name] = name
        else:
            ascii_part = data.ascii_name(name, 40).strip(".") or "class"
            folders[name] = f"{ascii_part}~{data.digest(name)}"
    return folders


def plan_jobs(train_set, sources, per_image, id_strength, ood_strengths, seed,
              kinds=("id", "near_ood")):
    """Every (image, kind, strength, m) to generate; sources: each training image's source id.
    A job's seed and file name depend only on (seed, source, kind, m) and the strength, so an
    image is the same whether made in one run, in another batch, or after a resume."""
    folders = class_folders(train_set.classes)
    # one ID strength; one or more near-OOD strengths (--strengths)
    strengths = {"id": [id_strength], "near_ood": list(ood_strengths)}
    jobs = []
    for i, source in enumerate(sources):
        label = int(train_set.labels[i])  # a variation keeps its source's class
        stem = data.ascii_name(os.path.splitext(os.path.basename(source))[0], 40)
        stem = f"{stem}-{data.digest(source, 6)}"  # the hash: two sources never share a name
        for kind in kinds:
            for m in range(per_image):
                # hashing, not a shared stream: an image's seed does not depend on which
                # images were made before it; shared across strengths, so that a strength
                # series of one (image, m) differs in strength alone
                job_seed = data.derive_seed(seed, source, kind, m)
                for s in strengths[kind]:
                    path = f"{kind}/{folders[train_set.classes[label]]}/{stem}_s{s:g}_{m}.png"
                    jobs.append(Job(i, label, kind, m, s, job_seed, path, source))
    return jobs


def manifest_row(job, classes, generator):
    """A job's row of manifest.csv (the columns of data.MANIFEST_COLUMNS)."""
    return {"path": job.path, "label": classes[job.label], "kind": job.kind, "source": job.source,
            # txt2img rows have no strength; %g writes 0.5, not 0.500000
            "strength": "" if job.strength is None else f"{job.strength:g}",
            "seed": str(job.seed), "generator": generator}  # strings: rows compare as csv text


# -----------------------------------------------------------------------------
# Generator 1: a small class-conditional DDPM, trained here (offline default)
def build_ddpm_unet(channels, image_size, num_classes):
    """UNet2DModel with class embeddings; class id num_classes is the null class (CFG)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       layers_per_block=1, block_out_channels=(16, 32),  # tiny: 16 and 32 channels
                       down_block_types=("DownBlock2D", "DownBlock2D"),  # no attention blocks
                       up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_classes + 1, norm_num_groups=8)  # K + 1: the null class


def ddpm_alpha_bar():
    """(1000,) alpha-bar of the DDPM's training schedule, the cosine one of Nichol & Dhariwal
    (2021)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod


def train_ddpm(images, labels, num_classes, folder, steps=400, batch_size=64, lr=2e-3, seed=0,
               device="cpu", null_share=0.1):
    """Train (or load from `folder`) the class-conditional DDPM on uint8 images (N, C, H, W).

    Epsilon prediction (Ho et al. 2020, Eq. 14) on images scaled to [-1, 1]; a share null_share
    of the labels is replaced by the null class, so one network learns both the conditional and
    the unconditional model (Ho & Salimans 2022, classifier-free guidance)."""
    from diffusers import UNet2DModel
    # what the model is trained on and how, down to a hash of the images and labels: checked on
    # reuse, so a folder's DDPM never serves another data set, split or setting
    fingerprint = hashlib.sha256(images.contiguous().numpy().tobytes() +
                                 labels.numpy().astype(np.int64).tobytes()).hexdigest()[:16]
    meta = {"classes": num_classes, "shape": list(images.shape[1:]), "steps": steps, "seed": seed,
            "batch_size": batch_size, "lr": lr, "null_share": null_share, "data": fingerprint}
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            differ = data.changed_settings(json.load(f), meta, meta, strict=True)
        if differ:  # never reuse a model trained on other data or settings
            raise GenerationError(f"{folder} holds a DDPM trained with other settings ("
                                  f"{', '.join(k for k, _, _ in differ)} differ); delete that "
                                  f"folder or pick another --out")
        print(f"reusing the DDPM in {folder}")
        # low_cpu_mem_usage=False: loads without the accelerate package
        unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet"), low_cpu_mem_usage=False)
        return unet.to(device).eval()
    torch.manual_seed(seed)  # the UNet's initial weights
    g = torch.Generator().manual_seed(seed)  # batches, noise and timesteps
    unet = build_ddpm_unet(images.shape[1], images.shape[2], num_classes).to(device)
    alpha_bar = ddpm_alpha_bar().to(device)  # (1000,)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    # one cycle: 10% of the steps up from lr / 25 to lr, then cosine down to about 0
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    x_all = images.float().div(127.5).sub(1).to(device)  # (N, C, H, W) in [-1, 1]
    y_all = labels.to(device)
    for _ in tqdm(range(steps), desc="train ddpm", dynamic_ncols=True, disable=None):
        idx = torch.randint(len(x_all), (batch_size,), generator=g).to(device)  # (B,)
        x0, y = x_all[idx], y_all[idx].clone()  # clone: the null-class edit must not touch y_all
        y[torch.rand(batch_size, generator=g).to(device) < null_share] = num_classes  # null class
        noise = torch.randn(x0.shape, generator=g).to(device)  # epsilon ~ N(0, I)
        t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)  # (B,) timesteps
        a = alpha_bar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1) alpha-bar_t per image
        # || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, y) ||^2
        prediction = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, class_labels=y).sample
        loss = F.mse_loss(prediction, noise)  # Ho et al.'s L_simple
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    def save(tmp):  # diffusers' folder layout, and what it was trained on (checked on reuse)
        unet.save_pretrained(os.path.join(tmp, "unet"))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
    data.atomic_write(folder, save)  # the whole folder appears at once
    return unet.eval()


def to_pil(image):
    """(C, H, W) uint8 -> PIL (L or RGB)."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C) as PIL expects
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)  # (H, W): mode L


def ddpm_generator(args, train_set, device):
    """Train or load the DDPM; returns make_images(batch of jobs) -> list of PIL images."""
    K = len(train_set.classes)
    unet = train_ddpm(train_set.images, train_set.labels, K, os.path.join(args.out, "ddpm"),
                      steps=args.ddpm_steps, batch_size=args.ddpm_batch_size, seed=args.seed,
                      device=device)

    def make_images(jobs):
        index = torch.tensor([j.index for j in jobs])  # (b,) the jobs' source images
        # jobs[0].strength for all: run_jobs batches one strength at a time
        varied = sdedit(unet, train_set.images[index], train_set.labels[index], jobs[0].strength,
                        args.guidance, [j.seed for j in jobs], K, args.steps)
        return [to_pil(v) for v in varied]  # (C, H, W) uint8 -> PIL
    return make_images


# -----------------------------------------------------------------------------
# Generator 2: Stable Diffusion (DA-Fusion proper)
def load_sd_pipeline(model, device, dtype):
    """StableDiffusionImg2ImgPipeline from a local folder or the local Hugging Face cache only.
    Never downloads: a model that is not here fails at once with what to do."""
    from diffusers import StableDiffusionImg2ImgPipeline
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            model, dtype=dtype, local_files_only=True, safety_checker=None,
            requires_safety_checker=False)  # no NSFW filter: it blacks out whole images
    except Exception as error:
        where = "folder" if os.path.isdir(model) else "Hugging Face cache"
        raise GenerationError(
            f"--model {model}: could not load a Stable Diffusion pipeline from the {where} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]}). Nothing is downloaded "
            f"here: fetch the model once with network access (e.g. `hf download {model}`), or "
            f"pass a local folder in diffusers' save_pretrained layout.") from error
    pipe.set_progress_bar_config(disable=True)  # run_jobs has its own bar
    return pipe.to(device)


def placeholder_tokens(token, num_vectors):
    """diffusers' multi-vector convention: "<tok>", "<tok>_1", ..., "<tok>_{n-1}"."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def textual_inversion(pipe, images, token, *, num_vectors=4, init_token="a", steps=1000, lr=5e-4,
                      batch_size=4, template="a photo of a {}", seed=0):
    """Learn `num_vectors` new token embeddings for one class on a frozen pipeline (Gal et al.
    2023). images: (N, 3, R, R) in [-1, 1] at the pipeline's resolution. Only the new rows of
    the token-embedding matrix train: AdamW's update touches the whole matrix (weight decay,
    moments), so every other row is copied back after each step -- otherwise all rows drift.
    Returns (embeddings (num_vectors, dim) in fp32, the loss of every step).

    Precision: the text encoder, whose rows train, runs in fp32 whatever the pipeline's dtype
    (as diffusers' textual-inversion example keeps it), so the rows and AdamW's moments are fp32:
    in fp16, AdamW's eps (1e-8) rounds to 0 and squared gradients below about 2.4e-4 underflow,
    and m / (sqrt(v) + eps) is inf after one step. The UNet and the VAE, the compute, stay in the
    pipeline's dtype; in fp16 the loss is scaled before backward (torch's GradScaler) so that
    small gradients survive the fp16 UNet's backward. Seeded: the images, the VAE's posterior
    samples, the noise and the timesteps all come from one generator seeded with `seed`."""
    from diffusers import DDPMScheduler
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    device, dtype = unet.device, text_encoder.dtype  # dtype: the pipeline's, restored at the end
    tokens = placeholder_tokens(token, num_vectors)  # num_vectors new words, one row each
    if tokenizer.add_tokens(tokens) != num_vectors:  # returns how many were new
        raise GenerationError(f"token {token} already exists in the tokenizer; choose another")
    init_ids = tokenizer.encode(init_token, add_special_tokens=False)  # ids without BOS, EOS
    if len(init_ids) != 1:
        raise GenerationError(f"--init-token {init_token!r} is {len(init_ids)} tokens; it must "
                              f"be one token")
    token_ids = tokenizer.convert_tokens_to_ids(tokens)  # (num_vectors,) their rows
    text_encoder.to(torch.float32)  # fp16 / bf16 -> fp32 is exact: the old rows keep their bits
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # (V + n, dim)
    # a fresh Parameter that nothing else shares: the resize may swap the tensor under the old
    # one, which autograd would still believe has the old number of rows
    layer = text_encoder.get_input_embeddings()
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    embeddings = layer.weight  # (V, dim) fp32
    with torch.no_grad():
        embeddings[token_ids] = embeddings[init_ids[0]].clone()  # start from the initializer
    frozen_rows = embeddings.detach().clone()  # what every other row must stay
    keep = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
    keep[token_ids] = False  # (V,) True = a row that must not change
    for module in (unet, vae, text_encoder):  # only the embedding matrix trains
        module.requires_grad_(False)
    embeddings.requires_grad_(True)  # the one trainable tensor
    text_encoder.train()  # as diffusers' textual-inversion example (CLIP has no dropout)
    opt = torch.optim.AdamW([embeddings], lr=lr, weight_decay=1e-2)  # as diffusers' example
    # fp16 gradients below 6e-8 are 0: the loss is scaled up (2^10 to start, halved on an
    # overflow, whose step is skipped); bf16 has fp32's range and needs no scaling
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10,
                                  enabled=unet.dtype == torch.float16)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's schedule
    prompt = template.format(" ".join(tokens))  # "a photo of a <tok> <tok>_1 <tok>_2 <tok>_3"
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)  # (1, 77)
    g = torch.Generator().manual_seed(seed)  # every draw below: images, posterior, noise, t
    losses = []
    for _ in tqdm(range(steps), desc=f"textual inversion {token}", dynamic_ncols=True,
                  disable=None):
        x = images[torch.randint(len(images), (batch_size,), generator=g)].to(device, vae.dtype)
        with torch.no_grad():  # (B, 4, R/8, R/8); the posterior's sample drawn from g
            latents = vae.encode(x).latent_dist.sample(generator=g) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                          generator=g).to(device)  # t ~ U{0, ..., T - 1}
        hidden = text_encoder(ids.repeat(batch_size, 1))[0]  # (B, 77, dim) fp32
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden.to(unet.dtype)).sample
        # what the UNet was trained to predict: the noise (v1) or the velocity (v-prediction)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" \
            else noise_scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(pred.float(), target.float())  # gradients reach only the embeddings
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # (unscaled again before the step)
        scaler.step(opt)  # skipped if an fp16 overflow made the gradient inf
        scaler.update()
        with torch.no_grad():  # restore every row but the placeholders, bit for bit
            embeddings[keep] = frozen_rows[keep]
        losses.append(loss.item())
    embeddings.requires_grad_(False)
    text_encoder.eval()
    vectors = embeddings[token_ids].detach().clone()  # fp32, as trained
    text_encoder.to(dtype)  # back to the pipeline's dtype for generation
    return vectors, losses


def save_embedding(path, token, vectors):
    """safetensors {token: (n, dim)}, the single-key format diffusers' load_textual_inversion
    reads; fp32 on disk whatever the pipeline's dtype."""
    from safetensors.torch import save_file
    data.atomic_write(path, lambda tmp: save_file({token: vectors.float().cpu().contiguous()}, tmp))


def pipeline_images(splits, index, resolution, resize, masks=None):
    """Real training images at the pipeline's resolution as RGB PIL: reread from their files
    when the data came from a folder (full detail; cropped to their masks as data.py crops
    them, with --masks), else upscaled from memory."""
    train_set, out = splits.train, []
    for i in index:
        name = train_set.names[i] if train_set.names else ""  # built-in sets' names are not files
        if os.path.isfile(name):  # a folder data set: the original file
            mask = data.mask_path(masks, name, splits.root) if masks else None
            tensor = data.open_image(name, 3, resolution, resize, mask_path=mask)  # at full detail
        else:
            tensor = train_set.images[i].expand(3, -1, -1)  # a grey image as RGB (no-op if RGB)
            tensor = F.interpolate(tensor[None].float(), size=(resolution, resolution),
                                   mode="bicubic", align_corners=False)
            tensor = tensor[0].round().clamp(0, 255).to(torch.uint8)  # bicubic overshoots
        out.append(to_pil(tensor).convert("RGB"))  # RGB: the pipeline's input
    return out


def load_mask(masks_dir, name, root, resolution, resize, dilate=15):
    """The object mask of a source image (white = object; data.mask_path's layout), cropped
    and resized exactly as its image (data.open_masked), made binary and dilated so that the
    repainted region covers the object's edge."""
    _, mask = data.open_masked(name, data.mask_path(masks_dir, name, root), resolution, resize)
    mask = mask.point(lambda v: 255 if v > 127 else 0)  # resizing blurred its edge
    return mask.filter(ImageFilter.MaxFilter(dilate))  # size 15: the mask grows 7 px on every side


def learn_class_tokens(args, pipe, splits, resolution, out):
    """One learned token per class ("a photo of a <token>"), trained once and reused from
    OUT/embeddings/<class folder>.safetensors. Returns {class id: prompt}."""
    train_set, prompts = splits.train, {}
    for c, (name, folder) in enumerate(class_folders(train_set.classes).items()):  # c: the class id
        token = f"<{folder.lower()}>"  # CLIP lower-cases prompts; folders differ ignoring case
        path = os.path.join(out, "embeddings", f"{folder}.safetensors")
        if os.path.exists(path):
            print(f"reusing the learned token {token} from {path}")
        else:
            index = torch.nonzero(train_set.labels == c).squeeze(1).tolist()  # class c's images
            real = pipeline_images(splits, index, resolution, args.resize, args.masks)
            x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in real])
            # a name of its own: load_textual_inversion adds <token> and refuses a known one
            vectors, losses = textual_inversion(
                pipe, x.float() / 127.5 - 1, f"<ti-{folder.lower()}>",
                num_vectors=args.num_vectors, init_token=args.init_token, steps=args.ti_steps,
                lr=args.ti_lr, batch_size=args.ti_batch, template=args.prompt,
                seed=data.derive_seed(args.seed, "textual inversion", name))
            save_embedding(path, token, vectors)
            print(f"{token}: textual inversion loss {np.mean(losses[:10]):.4f} -> "
                  f"{np.mean(losses[-10:]):.4f}")
        pipe.load_textual_inversion(path, token=token)  # the loader a diffusers user would call
        prompts[c] = args.prompt.format(token)  # the pipeline expands <token> to its n vectors
    return prompts


def sd_generator(args, splits, device):
    """Set up DA-Fusion on Stable Diffusion; returns make_images(batch of jobs) -> list of PIL."""
    train_set = splits.train
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]  # fp16 is slow on CPUs
    pipe = load_sd_pipeline(args.model, device, dtype)  # fails at once if not on disk
    # the model's native size: 64 latent pixels x 8 = 512 for v1.x
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if args.mode == "txt2img":  # the class name itself
        prompts = {c: args.prompt.format(name) for c, name in enumerate(train_set.classes)}
    else:
        # textual inversion: one learned token per class
        prompts = learn_class_tokens(args, pipe, splits, resolution, args.out)
    if args.compile:  # after textual inversion, which trains through the eager UNet
        pipe.unet = torch.compile(pipe.unet)
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    inpaint = bool(args.masks) and args.mode == "img2img"  # DA-Fusion inside the object's mask
    runner = pipe  # img2img: DA-Fusion's own mode; the others share its weights (no copy)
    if args.mode == "txt2img":
        runner = StableDiffusionPipeline(**pipe.components)
    elif inpaint:
        runner = StableDiffusionInpaintPipeline(**pipe.components)
    runner.set_progress_bar_config(disable=True)

    def make_images(jobs):
        kwargs = dict(prompt=[prompts[j.label] for j in jobs], guidance_scale=args.guidance,
                      num_inference_steps=args.steps, output_type="np",  # checked, then saved
                      # one generator per image: an image does not depend on its batch
                      generator=[torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs])
        if args.mode == "txt2img" or inpaint:  # no input image to take the size from
            kwargs.update(height=resolution, width=resolution)
        if args.mode == "img2img":  # run_jobs batches one strength at a time
            kwargs.update(image=pipeline_images(splits, [j.index for j in jobs], resolution,
                                                args.resize, args.masks),
                          strength=jobs[0].strength)  # diffusers runs int(strength x steps) steps
        if inpaint:  # the masks cropped and resized exactly as their images
            kwargs["mask_image"] = [load_mask(args.masks, train_set.names[j.index], splits.root,
                                              resolution, args.resize) for j in jobs]
        pixels = runner(**kwargs).images  # (b, R, R, 3) floats in [0, 1], in job order
        # a half-precision overflow (VAE decoding, guidance) gives NaN, which the PIL
        # conversion would silently turn into black pixels: refused instead
        broken = int((~np.isfinite(pixels)).reshape(len(jobs), -1).any(1).sum())
        if broken:
            raise GenerationError(f"Stable Diffusion made {broken} of {len(jobs)} images with "
                                  f"non-finite pixels in {pipe.unet.dtype} (an overflow of this "
                                  f"precision): run again with --dtype bf16 or fp32")
        # as diffusers' own PIL output: x 255, rounded, uint8
        return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
    return make_images


# -----------------------------------------------------------------------------
# The contact sheet: real | ID variations | near-OOD variations at each strength
def contact_sheet(out, jobs, train_set, path, per_class=2, per_group=2):
    """A picture a person can check: for a few images per class, the real image, then up to
    `per_group` of its variations of each (kind, strength), left to right."""
    plt = data.pyplot()
    by_source = {}  # source index -> (kind, strength) -> its jobs
    for j in jobs:
        by_source.setdefault(j.index, {}).setdefault((j.kind, j.strength), []).append(j)
    chosen = []  # the source images shown, per_class of each class
    for c in range(len(train_set.classes)):
        chosen += [i for i in by_source if int(train_set.labels[i]) == c][:per_class]
    if not chosen:  # no job yet: no sheet
        return None
    groups = sorted({g for i in chosen for g in by_source[i]},
                    key=lambda g: (g[0] != "id", g[1] or 0))  # ID first, then by strength
    cols = 1 + per_group * len(groups)  # the real image + per_group per group
    height = len(chosen) * 0.9 + 0.7  # inches: 0.9 per row + the titles
    fig, axes = plt.subplots(len(chosen), cols, figsize=(cols * 0.9, height), squeeze=False,
                             gridspec_kw=dict(wspace=0.05, hspace=0.05))  # tiles 5% apart
    fig.subplots_adjust(top=1 - 0.65 / height, bottom=0.02, left=0.08, right=0.99)
    for r, i in enumerate(chosen):
        row = [to_pil(train_set.images[i])]  # real, then each group's variations (or gaps)
        for g in groups:
            shown = by_source[i].get(g, [])[:per_group]
            row += [Image.open(os.path.join(out, j.path)) for j in shown]  # what the set holds
            row += [None] * (per_group - len(shown))  # gaps keep the columns aligned
        for col, ax in enumerate(axes[r]):
            ax.axis("off")
            if row[col] is not None:
                ax.imshow(row[col], cmap="gray" if row[col].mode == "L" else None)  # L: grey
        axes[r][0].text(-0.2, 0.5, data.drawable(train_set.classes[int(train_set.labels[i])]),
                        transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    axes[0][0].set_title("real", fontsize=7)
    for k, (kind, strength) in enumerate(groups):
        title = "ID" if kind == "id" else "near-OOD"
        title += f" s={strength:g}" if strength is not None else " txt2img"  # txt2img: no strength
        axes[0][1 + k * per_group].set_title(title, fontsize=7, loc="left")  # group's first column
    fig.suptitle("DA-Fusion variations: real image | ID variations | near-OOD variations "
                 "by strength", fontsize=9, y=1 - 0.1 / height)
    data.save_figure(fig, path, dpi=110)
    return path


# -----------------------------------------------------------------------------
# Plumbing: resuming a set, its output folder, train.py's cache
def is_valid_image(path):
    """True if the file exists and decodes completely."""
    try:
        with Image.open(path) as image:
            image.load()  # decode all: a truncated file fails here
        return True
    except Exception:  # any decoder error: not valid
        return False


def write_manifest(out, jobs, classes, generator):
    """manifest.csv listing exactly `jobs` (atomically: a reader never sees half of it)."""
    data.write_manifest(out, [manifest_row(j, classes, generator) for j in jobs])


def finished_jobs(out, jobs, classes, generator):
    """The jobs whose image a previous run finished: listed in OUT/manifest.csv with this job's
    row, and decodable. OUT holding another set -- a row that differs from its job (another
    seed, source, strength or generator), or rows this plan does not make (other --strengths,
    --kinds, --per-image or split) -- is refused, never overwritten or dropped."""
    previous = {row["path"]: row for _, row in data.manifest_rows(out)}  # path -> row
    planned = {job.path: job for job in jobs}  # path -> job
    other = [p for p, row in previous.items()
             if p not in planned or dict(row) != manifest_row(planned[p], classes, generator)]
    if other:
        raise GenerationError(f"--out {out}: holds {len(other)} image(s) of another set (seed, "
                              f"data split, strengths, kinds, variations or generator differ), "
                              f"e.g. {other[0]}; choose another --out, or delete that folder")
    return [job for job in jobs if job.path in previous  # listed, and the file decodes
            and is_valid_image(os.path.join(out, job.path))]


def run_jobs(out, jobs, classes, generator, make_images, batch_size):
    """Make the jobs no earlier run finished, batch by batch (one strength per batch); save each
    image atomically and rewrite the manifest after every batch. Returns how many images were
    missing (this rank made its share of them)."""
    done = finished_jobs(out, jobs, classes, generator)
    finished = {j.path for j in done}
    todo = [j for j in jobs if j.path not in finished]  # what this run still makes
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} images already in {out}")
    # under torchrun every rank takes every world-th missing image; rank 0 alone writes the
    # manifest (its own images and the earlier ones; generate() lists the others at the end)
    rank, world = data.distributed()
    data.barrier()  # every rank has read the old manifest before rank 0 rewrites it
    mine = todo[rank::world]  # rank r: todo[r], todo[r + W], ...

    def update_manifest():
        if rank == 0:
            write_manifest(out, [j for j in jobs if j.path in finished], classes, generator)

    try:
        with tqdm(total=len(mine), desc="generate", dynamic_ncols=True,
                  disable=None if rank == 0 else True) as bar:  # None: off when not a tty
            for strength in sorted({j.strength or 0.0 for j in mine}):  # None (txt2img) -> 0.0
                same = [j for j in mine if (j.strength or 0.0) == strength]
                for start in range(0, len(same), batch_size):
                    batch = same[start:start + batch_size]
                    for job, image in zip(batch, make_images(batch)):  # make_images keeps job order
                        data.atomic_write(os.path.join(out, job.path), image.save)  # PNG, by name
                        finished.add(job.path)
                    update_manifest()  # a stop now loses at most the batch being made
                    bar.update(len(batch))
    finally:  # also on Ctrl-C or an error: the manifest lists the finished images
        update_manifest()
    return len(todo)  # missing at the start, all ranks together


# what makes an image besides its manifest row; OUT/generation.json keeps them
SETTINGS = ("generator", "model", "mode", "guidance", "steps", "prompt", "num_vectors",
            "init_token", "ti_steps", "ti_lr", "ti_batch", "resolution", "dtype", "ddpm_steps",
            "ddpm_batch_size", "image_size", "resize", "masks")


def open_output(args, jobs, sheet):
    """The output folder, with the settings that make its images in OUT/generation.json: a
    resumed set must be made as it began (an image's manifest row cannot say its guidance or
    denoising steps), so once it holds an image other settings are refused. The temporaries a
    stopped run left beside the files this set writes are removed (never anything else)."""
    os.makedirs(args.out, exist_ok=True)
    record = {k: getattr(args, k, None) for k in SETTINGS}  # None for settings these args lack
    path = os.path.join(args.out, "generation.json")
    made = os.path.exists(os.path.join(args.out, "manifest.csv")) or any(
        os.path.exists(os.path.join(args.out, j.path)) for j in jobs)  # images of the set exist
    if made and os.path.exists(path):  # (a run that failed before its first image binds nothing)
        with open(path, encoding="utf-8") as f:
            changed = data.changed_settings(json.load(f), record, SETTINGS)
        if changed:
            k, old, new = changed[0]
            raise GenerationError(f"--out {args.out}: its images were made with --"
                                  f"{k.replace('_', '-')} {old!r}, not {new!r}; choose another "
                                  f"--out to make a set with other settings")
    data.write_text(path, json.dumps(record, indent=2))  # written before any image
    ours = [os.path.join(args.out, j.path) for j in jobs] + [
        os.path.join(args.out, "manifest.csv"), sheet, os.path.join(args.out, "ddpm")]
    embeddings = os.path.join(args.out, "embeddings")
    ours += [os.path.join(embeddings, f"{folder}.safetensors")
             for folder in {j.path.split("/")[1] for j in jobs}]  # <kind>/<class folder>/...
    data.remove_temporaries(ours)


# the cache key: what decides the training split, and what decides its images
DATA_KEYS = ("data", "image_size", "val_fraction", "seed", "examples_per_class", "ood_classes",
             "resize", "masks")
GENERATION_KEYS = ("id_strength", "ood_strength", "strengths", "per_image", "guidance", "steps",
                   "ddpm_steps", "ddpm_batch_size")


CACHE_ROOT = os.path.join(".cache", "dafusion")  # train.py's synthetic sets, by key


def cached_synthetic_set(args, splits, device, cache_root=CACHE_ROOT):
    """For train.py's --positives / --negatives without --synthetic: generate both kinds with the
    ddpm generator into a cache folder keyed by the data, split, few-shot subset and generator
    settings, or reuse it when it is already there. Returns the folder.

    Generation draws from the global random generator (the DDPM's initial weights); it runs on
    a copy of the random state, so a run draws the same numbers afterwards whether the set was
    generated now or read from the cache."""
    defaults = vars(build_parser().parse_args(["--out", cache_root]))  # dafusion.py's own
    settings = data.settings(defaults, args, {"generator": "ddpm", "model": None,
                                              "mode": "img2img", "kinds": "id,near_ood"})
    settings = with_generation_defaults(settings)  # the ddpm defaults are part of the key
    key = {k: getattr(settings, k) for k in DATA_KEYS + GENERATION_KEYS}
    key["strength"] = "alpha-bar of SD v1 img2img"  # sets of the older meaning are not reused
    folder = data.ascii_name(os.path.basename(str(args.data).rstrip("/\\")))
    digest = data.digest(json.dumps(key, sort_keys=True), 12)  # 12 hex digits: 48 bits
    settings.out = os.path.join(cache_root, f"{folder}-{digest}")  # .cache/dafusion/digits-<hex>
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            made = generate(settings, splits, device)  # 0 on a cache hit
    except KeyboardInterrupt:  # one line: what is kept, and how to go on
        print(f"\nCtrl-C while generating the synthetic set: its finished images are kept in "
              f"{settings.out}; the same command goes on from there", file=sys.stderr)
        raise  # run_command: exit status 130
    print(f"synthetic set {settings.out}: " + ("reused from the cache" if made == 0 else
                                               f"generated {made} images (cached for next time)"))
    return settings.out


# -----------------------------------------------------------------------------
# Command line
def add_generation_arguments(p):
    """The SDEdit and ddpm options (shared with train.py, which generates with the ddpm)."""
    strength = data.float_in(0, 1, low_open=True)  # (0, 1]: strength 0 would copy the source
    g = p.add_argument_group("generation (DA-Fusion)")
    g.add_argument("--id-strength", type=strength, default=0.2,
                   help="SDEdit strength of ID variations (thesis 0.2)")
    g.add_argument("--ood-strength", type=strength, default=0.5,
                   help="SDEdit strength of near-OOD variations (thesis 0.5)")
    g.add_argument("--strengths", type=data.strength_list, default=None, metavar="A,B,C",
                   help="near-OOD variations at each of these strengths in one set (replaces "
                        "--ood-strength), e.g. 0.3,0.5,0.7,0.9")
    g.add_argument("--per-image", type=data.int_at_least(1), default=4,
                   help="variations of each kind (and strength) per real image (M)")
    g.add_argument("--guidance", type=data.float_at_least(0), default=None,  # None: per generator
                   help="classifier-free guidance scale (default: 7.5 Stable Diffusion, 2 ddpm)")
    g.add_argument("--steps", type=data.int_at_least(1), default=None,  # None: per generator
                   help="denoising steps of a full generation; strength s runs s x steps of "
                        "them (default 50 Stable Diffusion, 20 ddpm)")
    g.add_argument("--gen-batch-size", type=data.int_at_least(1), default=None,
                   help="images per generation batch (default 8 Stable Diffusion, 256 ddpm)")
    d = p.add_argument_group("ddpm generator")
    d.add_argument("--ddpm-steps", type=data.int_at_least(1), default=400,
                   help="training steps of the small DDPM")
    d.add_argument("--ddpm-batch-size", type=data.int_at_least(1), default=64,
                   help="images per training step of the small DDPM")
    return p


def build_parser():
    """dafusion.py's command line: data, generation and Stable Diffusion options."""
    p = data.add_data_arguments(data.Parser(__doc__, "dafusion.py"))
    add_generation_arguments(p)
    p.add_argument("--kinds", default=None,  # check_generation parses it
                   help="which kinds to make: id, near_ood or both (default both; --mode "
                        "txt2img: id)")
    p.add_argument("--gen-device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    s = p.add_argument_group("stable-diffusion generator")
    s.add_argument("--generator", choices=["ddpm", "stable-diffusion"], default="ddpm",
                   help="ddpm: the small offline DDPM trained here; stable-diffusion: DA-Fusion "
                        "proper (needs --model)")
    s.add_argument("--model", default=None,
                   help="Stable Diffusion v1.x: hub id in your local cache, or a folder")
    s.add_argument("--mode", choices=["img2img", "txt2img"], default="img2img",
                   help="img2img: DA-Fusion on each real image; txt2img: from the class name")
    s.add_argument("--prompt", default="a photo of a {}", help="template; {} = token or name")
    s.add_argument("--num-vectors", type=data.int_at_least(1), default=4,
                   help="textual inversion: vectors per class token")
    s.add_argument("--init-token", default="a", help="textual inversion: one-token start word")
    s.add_argument("--ti-steps", type=data.int_at_least(1), default=1000,
                   help="textual inversion: optimiser steps per class")
    s.add_argument("--ti-lr", type=data.float_at_least(0, strict=True), default=5e-4,
                   help="textual inversion: learning rate (AdamW)")
    s.add_argument("--ti-batch", type=data.int_at_least(1), default=4,
                   help="textual inversion: real images per step")
    s.add_argument("--resolution", type=data.int_at_least(8), default=None,  # a multiple of 8
                   help="pixels, a multiple of 8 (default: the model's, 512 for v1.x)")
    s.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,  # None: by device
                   help="default fp16 on CUDA, fp32 elsewhere")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (GPU): the first batch compiles for a minute or "
                        "two, later batches run faster (benchmarks/bench_generate.py)")
    p.add_argument("--out", required=True, help="output folder (re-running resumes there)")
    return p


def with_generation_defaults(args):
    """A copy of args with the per-generator defaults filled in (guidance, steps, batch)."""
    sd = args.generator == "stable-diffusion"
    defaults = {"guidance": 7.5 if sd else 2.0, "steps": 50 if sd else 20,  # SD's usual values
                "gen_batch_size": 8 if sd else 256}
    return data.settings(args, data.unset_only(args, defaults))


def check_generation(args):
    """Refuse settings that cannot work, with one line each; returns the kinds to make."""
    sd = args.generator == "stable-diffusion"
    txt2img = sd and args.mode == "txt2img"  # no source image to drift from: ID images only
    text = args.kinds or ("id" if txt2img else "id,near_ood")  # --kinds' default
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in ("id", "near_ood") for k in kinds):
        raise GenerationError(f"--kinds must name id and/or near_ood; got {args.kinds!r}")
    if txt2img and "near_ood" in kinds:
        raise GenerationError("--mode txt2img makes ID images only (no source image to drift "
                              "from): drop near_ood from --kinds, or use --mode img2img")
    if sd and not args.model:
        raise GenerationError("--generator stable-diffusion needs --model (a hub id in your "
                              "cache or a folder)")
    data.check_named_files(args)  # --masks
    if args.resolution and args.resolution % 8:
        raise GenerationError(f"--resolution {args.resolution} must be a multiple of 8 (the "
                              f"VAE halves the side three times)")
    for name, strengths in (("--id-strength", [args.id_strength]),
                            ("--strengths" if args.strengths else "--ood-strength",
                             args.strengths or [args.ood_strength])):
        low = min(strengths)  # the weakest strength runs the fewest steps
        if sd and args.mode == "img2img" and int(args.steps * low) < 1:
            raise GenerationError(f"{name} {low} x --steps {args.steps} runs no denoising step "
                                  f"(diffusers rounds down); raise --steps or the strength")
    if sd and "{}" not in args.prompt:
        raise GenerationError(f"--prompt {args.prompt!r} has no {{}} where the class token (or "
                              f"name) goes, e.g. 'a photo of a {{}}'")
    try:
        args.prompt.format("x")  # "{} {}" or "{name}" fail here
    except (IndexError, KeyError, ValueError) as error:
        raise GenerationError(f"--prompt {args.prompt!r}: only one {{}} may stand in it "
                              f"({error})") from error
    return kinds


# the options each generator reads: the ddpm's given to Stable Diffusion, or the reverse, refused
GENERATOR_OPTIONS = {**{k: ("stable-diffusion",) for k in (
    "model", "mode", "prompt", "num_vectors", "init_token", "ti_steps", "ti_lr", "ti_batch",
    "resolution", "dtype", "compile")}, "ddpm_steps": ("ddpm",), "ddpm_batch_size": ("ddpm",)}


def check_options(args, given):
    """Options typed on the command line that this generator would not use, refused."""
    data.refuse_without_effect(given, GENERATOR_OPTIONS, args.generator,
                               f"with --generator {args.generator}")
    refuse_two_strengths(given)


def refuse_two_strengths(given):
    """--strengths replaces --ood-strength (dafusion.py and train.py read both)."""
    data.refuse_both(given, "strengths", "ood_strength", "--strengths makes every near-OOD "
                     "strength of the set: drop --ood-strength")


def main(argv=None):
    """Generate the synthetic set the arguments describe (torchrun: the ranks share it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(args, data.given_options(parser, argv))  # before the device and the data load
    device = data.init_distributed(data.pick_device(args.gen_device))  # torchrun: join the group
    try:
        generate(args, device=device)
    except KeyboardInterrupt:  # one line: what is kept, and the command that goes on
        kept = len(data.manifest_rows(args.out))
        command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        print(f"\nCtrl-C: kept the {kept} finished images in {args.out}; continue with: "
              f"python dafusion.py {command}", file=sys.stderr)
        raise  # run_command: exit status 130


if __name__ == "__main__":
    data.run_command(main)

