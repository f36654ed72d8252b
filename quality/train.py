"""Train the shapes model: ``python -m sdrt.quality.train --out FOLDER`` (needs the ``export`` extra).

A tiny Stable Diffusion in the real architecture (diffusers' ``AutoencoderKL`` and ``UNet2DConditionModel``,
transformers' ``CLIPTextModel`` with a CLIP BPE tokenizer), trained from scratch on this package's shapes
data set: first the VAE, then the UNet and the text encoder together. Saved by diffusers'
``StableDiffusionPipeline.save_pretrained`` (safetensors, fp16 weights to keep the folder small), so every
sdrt path takes it as it takes a user's checkpoint. ``training.json`` beside the weights records this
script's version, the seeds, the losses, the time, and the score of the diffusers pipeline on the quality
suite (``suite.py``), which the tests hold sdrt's own images to.

Fixed seeds; about an hour on 2 CPU cores with the defaults. The committed model in ``model/`` is this
script's output; CI never trains.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import shapes

VERSION = 1
DATA_SEED = 20261205  # the training pictures; the suite's and the held-out sets use other seeds
TORCH_SEED = 0
SIZE = shapes.SIZE
TOKENS = 77  # CLIP's context, as sdrt's runtime and diffusers pad to it
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# --- tokenizer --------------------------------------------------------------------------------------
def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's BPE of one lower-case word: its tokens and the merges it used, in the order applied."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    used: list[tuple[str, str]] = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in itertools.pairwise(symbols)}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols, used


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A CLIP BPE tokenizer cut down to the captions' words: CLIP's 512 byte symbols, the CLIP merges that
    build each caption word (in CLIP's order, so those words get CLIP's own tokens), bos and eos. Any other
    text still tokenizes (into smaller pieces). Returns the vocabulary."""
    from sdrt.export.tokenizer_assets import byte_symbols, clip_vocab_and_merges

    full_vocab, full_merges = clip_vocab_and_merges()
    ranks = {m: i for i, m in enumerate(full_merges)}
    needed: set[tuple[str, str]] = set()
    for w in shapes.vocabulary():
        needed.update(_bpe(w, ranks)[1])
    merges = [m for m in full_merges if m in needed]
    ordered = sorted(byte_symbols(), key=ord)
    tokens = ordered + [s + "</w>" for s in ordered] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) and all(full_vocab[t] is not None for t in tokens)
    folder.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": TOKENS, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False}, indent=2))
    return vocab


# --- architecture -----------------------------------------------------------------------------------
def vae_config() -> dict[str, Any]:
    """64 x 64 pictures to 16 x 16 x 4 latents (two downsamplings)."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "layers_per_block": 1, "norm_num_groups": 8, "sample_size": SIZE, "act_fn": "silu"}


def unet_config(cross: int) -> dict[str, Any]:
    return {"sample_size": SIZE // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
            "cross_attention_dim": cross, "norm_num_groups": 16, "act_fn": "silu"}


def text_config(vocab: dict[str, int]) -> dict[str, Any]:
    return {"vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
            "num_hidden_layers": 3, "max_position_embeddings": TOKENS, "hidden_act": "quick_gelu",
            "projection_dim": 64, "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}


# Stable Diffusion 1.5's noise schedule; the folder names PNDM as SD 1.5's does (sdrt's samplers read the betas)
NOISE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}
SCHEDULER = dict(NOISE, set_alpha_to_one=False, skip_prk_steps=True)


# --- training ---------------------------------------------------------------------------------------
def _pixels(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def train_vae(steps: int, batch: int, t0: float) -> tuple[Any, list[float]]:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    losses = []
    for step in range(steps):
        x = _pixels(shapes.batch(DATA_SEED * 7 + step, batch)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean() + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            _log(t0, f"vae {step + 1}/{steps} loss {np.mean(losses[-100:]):.5f}")
    return vae.eval(), losses


def encode_data(vae: Any, n: int, t0: float) -> tuple[Any, Any, list[str], float]:
    """The UNet's training set: ``n`` pictures' latent means and standard deviations, their captions, and
    the scaling factor (1 / the latents' standard deviation, as Stable Diffusion chose its 0.18215)."""
    import torch

    means, stds, captions = [], [], []
    with torch.no_grad():
        for i in range(0, n, 512):
            images, caps = shapes.batch(DATA_SEED + i, min(512, n - i))
            post = vae.encode(_pixels(images)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            captions += caps
    mean, std = torch.cat(means), torch.cat(stds)
    scale = float(1.0 / (mean + std * torch.randn(std.shape, generator=torch.Generator().manual_seed(1))).std())
    _log(t0, f"encoded {n} pictures; latent scaling factor {scale:.4f}")
    return mean, std, captions, scale


def train_unet(vae_scale: float, data: tuple[Any, Any, list[str]], vocab: dict[str, int], tok_dir: Path,
               steps: int, batch: int, t0: float) -> tuple[Any, Any, list[float]]:
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    mean, std, captions = data
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    ids = tok(captions + [""], padding="max_length", max_length=TOKENS, truncation=True,
              return_tensors="pt").input_ids
    empty = ids[-1:]
    ids = ids[:-1]
    text = CLIPTextModel(CLIPTextConfig(**text_config(vocab)))
    unet = UNet2DConditionModel(**unet_config(text.config.hidden_size))
    noise_sched = DDPMScheduler(**NOISE, clip_sample=False)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=6e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=6e-4, total_steps=steps, pct_start=0.03)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    gen = torch.Generator().manual_seed(TORCH_SEED + 1)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * vae_scale
        cond = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # unconditional rows, for classifier-free guidance
        cond[drop] = empty
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        zt = noise_sched.add_noise(z, noise, t)
        pred = unet(zt, t, encoder_hidden_states=text(cond).last_hidden_state).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting (Hang et al. 2023)
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            _log(t0, f"unet {step + 1}/{steps} loss {np.mean(losses[-100:]):.5f}")
    return ema_unet, ema_text, losses


def save(out: Path, vae: Any, unet: Any, text: Any, tok_dir: Path, scale: float) -> None:
    """Write the diffusers folder (fp16 safetensors) into ``out``."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
                                   unet=unet, scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / "tokenizer" / name)  # the exact files the model was trained with


# --- the LoRA ---------------------------------------------------------------------------------------
LORA_RANK = 4
LORA_DATA_SEED = DATA_SEED + 1  # the large-shape pictures


def train_lora(base: Path, out: Path, steps: int, batch: int, pictures: int, t0: float) -> dict[str, Any]:
    """A rank-4 LoRA on the UNet's attention projections that draws every shape larger than the base ever saw
    (the captions are the base's). Written as diffusers writes LoRAs (PEFT keys, safetensors) to ``out``;
    returns its training record.

    A variant of size, not of texture: the VAE, trained on solid shapes only, cannot draw an outline (tried:
    its reconstructions of outlined shapes lose the colour and fill the hole), and a UNet LoRA cannot teach
    the decoder."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(TORCH_SEED)
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, local_files_only=True)
    vae, unet, text, tok = pipe.vae.eval(), pipe.unet, pipe.text_encoder.eval(), pipe.tokenizer
    for m in (vae, unet, text):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    means, stds, captions = [], [], []
    with torch.no_grad():
        for i in range(0, pictures, 512):
            images, caps = shapes.batch(LORA_DATA_SEED + i, min(512, pictures - i), large=True)
            post = vae.encode(_pixels(images)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            captions += caps
        mean, std = torch.cat(means), torch.cat(stds)
        ids = tok(captions + [""], padding="max_length", max_length=TOKENS, truncation=True,
                  return_tensors="pt").input_ids
        states = text(ids).last_hidden_state  # the text encoder is frozen: its states once
    empty, states = states[-1:], states[:-1]
    scale = float(vae.config.scaling_factor)
    noise_sched = DDPMScheduler(**NOISE, clip_sample=False)
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(TORCH_SEED + 2)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        cond = states[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1
        cond[drop] = empty
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            _log(t0, f"lora {step + 1}/{steps} loss {np.mean(losses[-100:]):.5f}")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    with tempfile.TemporaryDirectory(prefix=".sdrt-lora-", dir=out.parent) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        (Path(tmp) / "pytorch_lora_weights.safetensors").rename(out)
    return {"script": "sdrt.quality.train --lora", "version": VERSION, "data_seed": LORA_DATA_SEED,
            "torch_seed": TORCH_SEED, "rank": LORA_RANK, "steps": steps, "batch": batch, "pictures": pictures,
            "final_loss": round(float(np.mean(losses[-100:])), 6), "seconds": round(time.perf_counter() - t0, 1)}


def record_score(folder: Path) -> dict[str, Any]:
    """Score diffusers' own pipeline on ``folder`` over the quality suite and add it to training.json."""
    import torch
    from diffusers import StableDiffusionPipeline

    from .suite import score_diffusers

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    report = score_diffusers(pipe)
    path = folder / "training.json"
    record = json.loads(path.read_text())
    record["diffusers_score"] = report.to_dict()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return record["diffusers_score"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.quality.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the diffusers folder to write (must not exist)")
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--unet-steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=32, help="VAE batch; the UNet's is twice this")
    ap.add_argument("--pictures", type=int, default=20000, help="training pictures for the UNet")
    ap.add_argument("--rescore", action="store_true",
                    help="only score the trained folder --out with diffusers' pipeline again (training.json)")
    ap.add_argument("--lora", type=Path, default=None, metavar="FILE",
                    help="train the large-shapes LoRA on the model folder --out instead, into FILE (.safetensors, must "
                         "not exist; its record goes beside it as .json)")
    ap.add_argument("--lora-steps", type=int, default=800)
    args = ap.parse_args(argv)
    if args.lora is not None:
        if args.lora.exists():
            print(f"{args.lora} exists; choose a new --lora (this script never overwrites a file)", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        record = train_lora(args.out, args.lora, args.lora_steps, args.batch, args.pictures // 4, t0)
        from .suite import lora_effect

        record["effect"] = lora_effect(args.out, args.lora)
        atomic = args.lora.with_suffix(".json.tmp")
        atomic.write_text(json.dumps(record, indent=2) + "\n")
        atomic.replace(args.lora.with_suffix(".json"))
        _log(t0, f"wrote {args.lora}: {record['effect']}")
        return 0
    if args.rescore:
        print(json.dumps(record_score(args.out), indent=2))
        return 0
    if args.out.exists():
        print(f"{args.out} exists; choose a new --out (this script never overwrites a folder)", file=sys.stderr)
        return 2
    import torch

    torch.manual_seed(TORCH_SEED)
    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sdrt-train-", dir=args.out.parent) as tmp:
        tok_dir = Path(tmp) / "tok"
        vocab = write_tokenizer(tok_dir)
        _log(t0, f"tokenizer: {len(vocab)} tokens")
        vae, vae_losses = train_vae(args.vae_steps, args.batch, t0)
        mean, std, captions, scale = encode_data(vae, args.pictures, t0)
        unet, text, unet_losses = train_unet(scale, (mean, std, captions), vocab, tok_dir, args.unet_steps,
                                             args.batch * 2, t0)
        folder = Path(tmp) / "model"
        save(folder, vae, unet, text, tok_dir, scale)
        record = {
            "script": "sdrt.quality.train", "version": VERSION, "data_seed": DATA_SEED, "torch_seed": TORCH_SEED,
            "torch": torch.__version__, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
            "batch": args.batch, "unet_batch": args.batch * 2, "pictures": args.pictures,
            "vae_final_loss": round(float(np.mean(vae_losses[-100:])), 6),
            "unet_final_loss": round(float(np.mean(unet_losses[-100:])), 6),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        folder.rename(args.out)
    _log(t0, f"wrote {args.out}; scoring it with diffusers' pipeline")
    try:
        summary = record_score(args.out)
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # the weights are safe; score again later
        print(f"scoring failed ({e}); rerun: python -m sdrt.quality.train --out {args.out} --rescore", file=sys.stderr)
        return 1
    _log(t0, f"diffusers' pipeline on the quality suite: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
