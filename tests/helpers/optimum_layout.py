"""Optimum-contract ONNX exports of the tiny synthetic models, made in the tests.

Optimum's exporter (optimum-onnx 0.1.0) cannot be installed beside sdrt's pins: it requires
transformers < 4.58, and the diffusers here needs transformers 5 / huggingface-hub >= 1.32. So these
folders are made by exporting the same diffusers modules the way Optimum's exporter does (its
``optimum/exporters/utils.py`` and ``onnx/model_configs.py``, read from the 0.1.0 wheels): the same
forward functions, input and output names, dtypes and dynamic axes, a ``config.json`` per component, the
diffusers ``model_index.json``, and tokenizers as ``vocab.json`` + ``merges.txt``.

- text encoders: ``input_ids`` int64 -> ``last_hidden_state``, ``pooler_output`` (CLIPTextModel) or
  ``text_embeds``, ``last_hidden_state`` (CLIPTextModelWithProjection); SDXL's also ``hidden_states.0`` ..
  ``hidden_states.L`` (Optimum sets ``output_hidden_states`` for SDXL)
- unet: ``sample``, ``timestep`` (a 0-d float of the export dtype), ``encoder_hidden_states`` (+ SDXL
  ``text_embeds``, ``time_ids``) -> ``out_sample``
- vae_encoder: ``sample`` -> ``latent_parameters`` (``encode(x).latent_dist.parameters``)
- vae_decoder: ``latent_sample`` -> ``sample`` (``decode(z)``: float NCHW in [-1, 1], no latent scaling)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdrt.export.loading import LoadedModel
from sdrt.export.tokenizer_assets import clip_vocab_and_merges

OPSET = 17


class _Text(torch.nn.Module):
    def __init__(self, enc: torch.nn.Module, hidden_states: bool) -> None:
        super().__init__()
        if hasattr(enc, "set_attn_implementation"):
            enc.set_attn_implementation("eager")  # the TorchScript exporter's SDPA symbolic is broken for CLIP
        self.enc, self.hs = enc, hidden_states

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.enc(input_ids, output_hidden_states=self.hs, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else (
            out.last_hidden_state, out.pooler_output)
        return (*first, *(out.hidden_states if self.hs else ()))


class _Unet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, xl: bool) -> None:
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        kw = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}} if self.xl else {}
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kw)[0]


class _Encoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


class _Decoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], external: bool = False) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    if external:  # as Optimum writes large graphs: weights in model.onnx_data beside the graph
        m = onnx.load(str(path))
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx_data", size_threshold=0)


def _config(module: torch.nn.Module) -> dict:
    cfg = module.config
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def write_optimum_export(model: LoadedModel, out: Path, *, fp16: bool = False, drop: tuple[str, ...] = ()) -> Path:
    """An Optimum-contract export of ``model`` in ``out`` (``drop``: components left out, for bad-input tests)."""
    xl = model.preset.family == "sdxl"
    dt = torch.float16 if fp16 else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, enc in enumerate(model.text_encoders):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        if name in drop:
            continue
        layers = enc.config.num_hidden_layers
        proj = hasattr(enc, "text_projection")
        outs = ["text_embeds", "last_hidden_state"] if proj else ["last_hidden_state", "pooler_output"]
        outs += [f"hidden_states.{k}" for k in range(layers + 1)] if xl else []
        ids = torch.randint(0, enc.config.vocab_size, (1, 77), generator=g)
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                **{o: {0: "batch_size", 1: "sequence_length"} for o in outs}}
        _export(_Text(enc.to(dt), xl), (ids,), out / name / "model.onnx", ["input_ids"], outs, axes,
                external=i == 1)
        enc.float()
        (out / name / "config.json").write_text(json.dumps(_config(enc), default=str))
    unet = model.unet.to(dt)
    c = unet.config
    cross = c.cross_attention_dim
    args: tuple = (torch.randn(2, c.in_channels, 8, 12, generator=g).to(dt), torch.tensor(500.0, dtype=dt),
                   torch.randn(2, 77, cross, generator=g).to(dt))
    names = ["sample", "timestep", "encoder_hidden_states"]
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    if xl:
        pooled = model.text_encoders[1].config.projection_dim
        args += (torch.randn(2, pooled, generator=g).to(dt), torch.randn(2, 6, generator=g).to(dt))
        names += ["text_embeds", "time_ids"]
        axes.update(text_embeds={0: "batch_size"}, time_ids={0: "batch_size"})
    if "unet" not in drop:
        _export(_Unet(unet, xl), args, out / "unet" / "model.onnx", names, ["out_sample"], axes, external=True)
        (out / "unet" / "config.json").write_text(json.dumps(_config(unet), default=str))
    model.unet.float()
    vae = model.vae.to(dt)
    if "vae_encoder" not in drop:
        _export(_Encoder(vae), (torch.rand(1, 3, 64, 96, generator=g).to(dt) * 2 - 1,),
                out / "vae_encoder" / "model.onnx", ["sample"], ["latent_parameters"],
                {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                 "latent_parameters": {0: "batch_size", 2: "h", 3: "w"}})
        (out / "vae_encoder" / "config.json").write_text(json.dumps(_config(vae), default=str))
    if "vae_decoder" not in drop:
        _export(_Decoder(vae), (torch.randn(1, vae.config.latent_channels, 8, 12, generator=g).to(dt),),
                out / "vae_decoder" / "model.onnx", ["latent_sample"], ["sample"],
                {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                 "sample": {0: "batch_size", 2: "h", 3: "w"}})
        (out / "vae_decoder" / "config.json").write_text(json.dumps(_config(vae), default=str))
    model.vae.float()
    vocab, merges = clip_vocab_and_merges()
    for i, pad in enumerate(model.preset.pad_tokens):
        tdir = out / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        tdir.mkdir(exist_ok=True)
        (tdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                         encoding="utf-8")
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        (tdir / "tokenizer_config.json").write_text(json.dumps(
            {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
        (tdir / "special_tokens_map.json").write_text(json.dumps(special))
    sched = out / "scheduler"
    sched.mkdir(exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps(model.scheduler_config))
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.35.2", "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    (out / "model_index.json").write_text(json.dumps(index))
    return out
