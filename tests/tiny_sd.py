"""A tiny Stable Diffusion v1-architecture pipeline built from configs, offline, for tests.

The CLIP tokenizer is the offline recipe of ../shared/REFERENCE.md: byte-level characters only
(ids 0-255), each with "</w>" (256-511), start 512, end 513, and no merges, so every word is
tokenised per character. Weights are random; the code paths are the real ones.
"""

import json
import os

import torch


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map (256 characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tokenizer(folder):
    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def build_pipeline_folder(folder, text, unet, vae, dtype=torch.float32, seed=0, unet_blocks=None,
                          vae_blocks=2, cross_attention_scale=1.0):
    """Write a StableDiffusionImg2ImgPipeline with random weights to `folder` (save_pretrained
    layout), built from config dicts: text (CLIPTextConfig sizes), unet and vae
    (UNet2DConditionModel / AutoencoderKL sizes). Returns the UNet's parameter count.
    Used by the tests (tiny) and by benchmarks/bench_generate.py (Stable Diffusion v1's sizes)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTokenizer, CLIPTextModel
    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, max_position_embeddings=77, bos_token_id=512,
                                                eos_token_id=513, pad_token_id=513, **text))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **(unet_blocks or {}), **unet)
    if cross_attention_scale != 1.0:
        # random cross-attention barely lets the prompt through; scaled up, the prompt changes the
        # prediction as in a trained model (textual inversion then has something to learn)
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.mul_(cross_attention_scale)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks, **vae)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # as SD v1.x ships
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.to(dtype).save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def build_tiny_pipeline(folder, seed=0):
    """Write a tiny StableDiffusionImg2ImgPipeline to `folder` (save_pretrained layout); 32 px images."""
    build_pipeline_folder(
        folder, seed=seed, cross_attention_scale=30.0, vae_blocks=2,
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
                  norm_num_groups=32),
        unet_blocks=dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(block_out_channels=(32, 64), norm_num_groups=32, sample_size=32))
    return folder
