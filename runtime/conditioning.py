"""The text stage: prompts (or precomputed embeddings) -> ``PromptEmbeddings`` on the device, by the model
family's encoders and rules (how encoders are joined, the pooled embedding, zeros for empty negatives). Each
prompt dialect has its module (runtime/plain_conditioning.py, a1111_conditioning.py, compel_conditioning.py),
the encoders' runs theirs (runtime/text_encoders.py); ``TextConditioning`` picks the dialect."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .a1111_conditioning import a1111_chunks, check_a1111, emphasized, segment_texts, weighted_rows
from .compel_conditioning import check_compel, compel_chunks, compel_outputs, takes_masks
from .device_graphs import DeviceGraphs
from .engine import Array, Backend, Engine
from .errors import ArtifactError, InputError
from .families import Family
from .manifest import ExportManifest
from .plain_conditioning import plain_rows, warn_cut
from .request import float_array, is_int
from .results import PromptEmbeddings
from .t5_tokenizer import MAX_LENGTH as T5_MAX_LENGTH
from .t5_tokenizer import T5Tokenizer
from .text_encoders import EncoderRunner
from .tokenizer import PromptTokenizer


class TextConditioning:
    """A model's text encoders and tokenizers on a backend; ``dtype`` is the denoiser's."""

    def __init__(self, manifest: ExportManifest, backend: Backend, engines: Mapping[str, Engine],
                 tokenizers: Sequence[PromptTokenizer], graphs: DeviceGraphs, dtype: np.dtype[Any]) -> None:
        self.manifest = manifest
        self.family: Family = manifest.model_family
        self.backend = backend
        self.engines = engines
        self.tokenizers = list(tokenizers)
        self.graphs = graphs
        self.dtype = dtype
        self.runner = EncoderRunner(backend, engines)

    def chunks(self, texts: Sequence[str], syntax: str = "plain") -> tuple[int, ...]:
        """The number of 77-token chunks each tokenizer makes of these texts (together) in this prompt syntax
        (A1111's: over every segment of their prompt editing)."""
        if syntax == "a1111":
            every = segment_texts(texts)
            self.check_a1111(every)
            if self.family.chunked:
                return a1111_chunks(self.tokenizers, every)
        if syntax == "compel":
            self.check_compel(texts)
            if self.family.chunked:  # compel pads every encoder's states to the longest
                return (compel_chunks(self.tokenizers, texts, self.compel_masks),) * len(self.tokenizers)
        return tuple(int(plain_rows(self.family, tok, list(texts)).shape[1]) for tok in self.tokenizers)

    def check_a1111(self, texts: Sequence[str]) -> None:
        """A1111's emphasis and BREAK refused, before any work, where the family reads prompts as plain text
        (runtime/a1111_conditioning.py)."""
        check_a1111(self.family, texts)

    def check_compel(self, texts: Sequence[str]) -> None:
        """compel's syntax parsed, and its weights, blends and conjunctions refused where the family reads prompts
        as plain text, before any work (runtime/compel_conditioning.py)."""
        check_compel(self.family, texts)

    @property
    def compel_masks(self) -> bool:
        """compel's default downweighting (MASK) applies: every text encoder takes an attention mask."""
        return takes_masks(self.manifest)

    def check_sequence_length(self, max_sequence_length: Any) -> int:
        """The T5 tokens per prompt a call asks for (``max_sequence_length``; None: the family's default),
        checked before any work: an integer from 2 to 512 (diffusers' limit) and at most the tokenizer's own,
        on a family with a T5 encoder, that the backend's engines take (TensorRT: the build profile's range)."""
        default = self.family.text_tokens
        if max_sequence_length is None:
            if self.family.takes_sequence_length:
                self.backend.check_t5_tokens(default, default)
            return default
        if not self.family.takes_sequence_length:
            raise InputError(f"max_sequence_length sets T5's tokens per prompt; {self.family.label} has no T5 "
                             "encoder (its CLIP encoders read 77-token chunks): leave it out",
                             cli=f"--max-sequence-length is for models with a T5 encoder; {self.family.label} "
                                 "has none: leave it out")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) \
                or not 2 <= max_sequence_length <= T5_MAX_LENGTH:
            raise InputError(f"max_sequence_length must be an integer from 2 to {T5_MAX_LENGTH} (T5 tokens per "
                             f"prompt; {self.family.label}'s default {self.family.text_tokens}), got "
                             f"{max_sequence_length!r}",
                             cli=f"--max-sequence-length must be from 2 to {T5_MAX_LENGTH}, got {max_sequence_length!r}")
        for tok in self.tokenizers:
            if isinstance(tok, T5Tokenizer):
                tok.with_length(int(max_sequence_length))  # its own model_max_length
        self.backend.check_t5_tokens(int(max_sequence_length), default)
        return int(max_sequence_length)

    def zero_negatives(self, negative_prompt: Any) -> bool:
        """Guided with no negative prompt: the family's rule (diffusers' force_zeros_for_empty_prompt)."""
        return self.family.zero_negatives and negative_prompt is None

    def encode(self, prompts: list[str], b: int, guided: bool, zero_negatives: bool = False,
               syntax: str = "plain", chunks: int = 1, max_sequence_length: int | None = None,
               lora: Mapping[str, Mapping[str, Array]] | None = None) -> PromptEmbeddings:
        """Text encoders -> embeddings on the device. With one encoder and one chunk the encoder's output
        is the UNet's input as it is; otherwise the chunks and encoders are joined on the device by the
        join graph (runtime/text_join.py). ``syntax`` "a1111": A1111's emphasis, BREAK and chunking
        (runtime/weighted_prompts.py; the weighted states pass through the host once), in at least ``chunks``
        chunks (the segments of a prompt-editing call are encoded alike). ``max_sequence_length``: T5's tokens
        per prompt for this call (None: the family's, ``text_tokens``; see ``check_sequence_length``). ``lora``:
        the LoRA factor inputs of the encoders that have slots (export/lora_slots.py), by encoder name."""
        be, dt = self.backend, self.dtype
        outs: list[dict[str, Array]] = []
        rows = 0
        a1111 = syntax == "a1111"
        if a1111:
            self.check_a1111(prompts)
        if syntax == "compel":
            self.check_compel(prompts)
        t5_tokens = self.check_sequence_length(max_sequence_length)
        if syntax == "compel" and self.family.chunked:  # compel's states, every encoder at once (padded alike)
            outs, k = compel_outputs(self.runner, self.manifest, self.tokenizers, prompts, chunks, lora)
            rows = len(prompts)
        else:
            outs, rows, k = self._encoder_outputs(prompts, a1111, chunks, max_sequence_length, t5_tokens, lora)
        if (len(outs) == 1 and k == 1 and not zero_negatives and "text_embeds" not in outs[0]
                and be.meta(outs[0]["hidden_states"])[0] == dt):
            # already [rows, 77, C] in the UNet's dtype: no host round trip
            return PromptEmbeddings(outs[0]["hidden_states"], None, b, guided)
        if self.family.host_join:
            return self._join_on_host(outs, b, guided, zero_negatives, t5_tokens)
        pooled = next((o["text_embeds"] for o in reversed(outs) if "text_embeds" in o), None)
        join = self._join_graph([o["hidden_states"] for o in outs], pooled)
        keep = np.ones(rows, np.float32)
        if zero_negatives:
            keep[:b] = 0
        feeds = {f"hidden_{j}": o["hidden_states"] for j, o in enumerate(outs)}
        if pooled is not None:
            feeds["text_embeds"] = pooled
        joined = join({**feeds, "keep": be.to_device(keep)})
        return PromptEmbeddings(joined["hidden"], joined.get("pooled"), b, guided)

    def _encoder_outputs(self, prompts: list[str], a1111: bool, chunks: int, max_sequence_length: int | None,
                         t5_tokens: int, lora: Mapping[str, Mapping[str, Array]] | None
                         ) -> tuple[list[dict[str, Array]], int, int]:
        """Each encoder's outputs for the prompts, as they are or (A1111's syntax) with its emphasis; and the rows
        and chunks they hold."""
        outs: list[dict[str, Array]] = []
        rows = k = 0
        for name, tok in zip(self.manifest.encoder_names, self.tokenizers, strict=True):
            if max_sequence_length is not None and isinstance(tok, T5Tokenizer):
                tok = tok.with_length(t5_tokens)
            if not self.family.chunked:
                warn_cut(self.family, name, tok, prompts)
            weights = None
            if a1111 and self.family.chunked:
                ids, weights = weighted_rows(tok, prompts, chunks)
            else:
                ids = plain_rows(self.family, tok, prompts)  # [rows, k, 77] (T5: [rows, 1, its tokens])
            rows, k, n = ids.shape
            out = self.engines[name]({**self.runner.feeds(name, ids.reshape(rows * k, n)),
                                      **((lora or {}).get(name) or {})})
            if weights is not None:  # A1111's emphasis on this encoder's states, per prompt and chunk
                out = emphasized(self.backend, out, weights)
            outs.append(out)
        return outs, rows, k

    def _join_on_host(self, outs: list[dict[str, Array]], b: int, guided: bool,
                      zero_negatives: bool, t5_tokens: int) -> PromptEmbeddings:
        """The family's own join (``Family.join_on_host``) of the encoders' outputs brought to the host."""
        be, dt = self.backend, self.dtype
        names = self.manifest.encoder_names
        hidden = {n: be.to_host(o["hidden_states"]) for n, o in zip(names, outs, strict=True)}
        pooled = {n: be.to_host(o["text_embeds"]) for n, o in zip(names, outs, strict=True) if "text_embeds" in o}
        width = self.engines["unet"].inputs["encoder_hidden_states"].shape[-1]
        if not isinstance(width, int):
            raise ArtifactError(f"the {self.family.label} denoiser's encoder_hidden_states has no fixed width; "
                                "re-export the model with `sdrt export`")
        h, p = self.family.join_on_host(hidden, pooled, width, t5_tokens)
        if zero_negatives:
            h[:b] = 0
            if p is not None:
                p[:b] = 0
        return PromptEmbeddings(be.to_device(np.ascontiguousarray(h, dtype=dt)),
                                None if p is None else be.to_device(np.ascontiguousarray(p, dtype=dt)), b, guided)

    def _join_graph(self, hidden: list[Array], pooled: Array | None) -> Engine:
        """The join graph of the manifest's variant (runtime/text_join.py), loaded once; ArtifactError where the
        encoders' outputs are not what the manifest records (the engines are not the export's)."""
        from .text_join import join_variant

        be = self.backend
        variant = join_variant(self.manifest)
        have = (tuple(be.meta(h)[0].name for h in hidden), None if pooled is None else be.meta(pooled)[0].name,
                self.dtype.name)
        want = (variant.hidden_dtypes, variant.pooled_dtype, variant.out_dtype)
        rows = [be.meta(h)[1][0] for h in hidden]
        if len(set(rows)) != 1:
            raise ArtifactError(f"the text encoders' tokenizers split the prompts into {rows} rows of 77-token chunks; "
                                "the join needs the same for each: the tokenizers are not the export's, re-export "
                                "the model with `sdrt export`")
        if have != want:
            raise ArtifactError(
                f"the text encoders give {have[0]} hidden states (pooled: {have[1]}) for a {have[2]} UNet, but the "
                f"manifest of {self.manifest.preset} records {want[0]} (pooled: {want[1]}) for {want[2]}: the "
                "engines are not the export's; rebuild them from it (`sdrt build ONNX_DIR --out ENGINES`)")
        return self.graphs.get(variant.name, variant.graph_bytes, "the prompt embeddings are joined")

    def denoiser_inputs(self, emb: PromptEmbeddings, height: int, width: int,
                        scores: tuple[float | None, float | None] | None, guidance_scale: float) -> dict[str, Array]:
        """What the denoiser is conditioned on besides the latents and timestep, on the device: the text states,
        the pooled embedding, the family's added conditioning (SDXL's time ids), an LCM-distilled UNet's
        guidance-scale embedding (``timestep_cond``), and a guidance-distilled transformer's scale (``guidance``,
        FLUX.1 [dev]: diffusers' ``guidance``, the scale itself per image)."""
        to_dev, dt, b = self.backend.to_device, self.dtype, emb.batch
        cond = {"encoder_hidden_states": emb.hidden}
        if emb.pooled is not None:
            cond[self.family.pooled_input] = emb.pooled
        for name, value in self.family.extra_conditioning(height, width, b, emb.guided, scores).items():
            cond[name] = to_dev(value.astype(dt))
        unet_inputs = self.engines["unet"].inputs
        if "timestep_cond" in unet_inputs:  # an LCM-distilled UNet: guidance as an embedding
            dim = int(unet_inputs["timestep_cond"].shape[-1])  # type: ignore[arg-type]
            cond["timestep_cond"] = to_dev(np.tile(guidance_embedding(guidance_scale - 1.0, dim).astype(dt), (b, 1)))
        if "guidance" in unet_inputs:  # a guidance-distilled transformer (FLUX.1 [dev]): the scale, one per row
            cond["guidance"] = to_dev(np.full(b, guidance_scale, unet_inputs["guidance"].dtype))
        return cond

    def from_arrays(self, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray | None, *,
                    pooled_prompt_embeds: np.ndarray | None, negative_pooled_prompt_embeds: np.ndarray | None,
                    guided: bool, batch_size: int) -> PromptEmbeddings:
        """Precomputed embeddings -> PromptEmbeddings (see ``Pipeline.embeddings_from``)."""
        fam = self.family
        width = self.engines["unet"].inputs["encoder_hidden_states"].shape[-1]
        pos = float_array(prompt_embeds, "prompt_embeds", 3)
        if not is_int(batch_size) or batch_size < 1:
            raise InputError(f"batch_size {batch_size!r} must be an integer >= 1 (images per embedding row)")
        if isinstance(width, int) and pos.shape[-1] != width:
            raise InputError(f"prompt_embeds are {pos.shape[-1]} wide; this model's UNet takes {width}")
        pooled = None
        if fam.pooled:
            if pooled_prompt_embeds is None:
                raise InputError(f"an {fam.label} model needs pooled_prompt_embeds [B, P] beside prompt_embeds")
            pooled = float_array(pooled_prompt_embeds, "pooled_prompt_embeds", 2)
            if pooled.shape[0] != pos.shape[0]:
                raise InputError(f"pooled_prompt_embeds have {pooled.shape[0]} rows, prompt_embeds "
                                 f"{pos.shape[0]}: give one pooled row per prompt row")
        elif pooled_prompt_embeds is not None:
            raise InputError(f"pooled_prompt_embeds are for models with a pooled text embedding (SDXL); this is an "
                             f"{fam.label} model ({self.manifest.family})")
        if guided:
            if negative_prompt_embeds is None and not fam.zero_negatives:
                raise InputError("guided generation from prompt_embeds needs negative_prompt_embeds "
                                 "(or guidance_scale <= 1)")
            neg = np.zeros_like(pos) if negative_prompt_embeds is None else float_array(
                negative_prompt_embeds, "negative_prompt_embeds", 3)
            if neg.shape != pos.shape:
                raise InputError(f"negative_prompt_embeds {list(neg.shape)} must match prompt_embeds "
                                 f"{list(pos.shape)}")
            pos = np.concatenate([np.repeat(neg, batch_size, axis=0), np.repeat(pos, batch_size, axis=0)])
            if pooled is not None:
                npool = (np.zeros_like(pooled) if negative_pooled_prompt_embeds is None
                         else float_array(negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", 2))
                if npool.shape != pooled.shape:
                    raise InputError(f"negative_pooled_prompt_embeds {list(npool.shape)} must match "
                                     f"pooled_prompt_embeds {list(pooled.shape)}")
                pooled = np.concatenate([np.repeat(npool, batch_size, axis=0),
                                         np.repeat(pooled, batch_size, axis=0)])
        else:
            pos = np.repeat(pos, batch_size, axis=0)
            pooled = None if pooled is None else np.repeat(pooled, batch_size, axis=0)
        b = pos.shape[0] // (2 if guided else 1)
        dt, to_dev = self.dtype, self.backend.to_device
        return PromptEmbeddings(to_dev(pos.astype(dt)), None if pooled is None else to_dev(pooled.astype(dt)),
                                b, guided)


def guidance_embedding(w: float, dim: int) -> np.ndarray:
    """LCM's guidance-scale embedding of w = guidance - 1 (VDM's sinusoidal embedding of 1000 w), [1, dim],
    in float32 step for step as diffusers' ``get_guidance_scale_embedding``."""
    half = dim // 2
    scale = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -scale)
    args = np.float32(w * 1000.0) * freqs
    emb = np.concatenate([np.sin(args), np.cos(args)])
    return np.pad(emb, (0, dim % 2))[None].astype(np.float32)
