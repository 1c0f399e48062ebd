"""Random-weight FULL-SIZE models in Hugging Face formats, written offline, for benchmarks on a GPU
machine that cannot reach a model hub.

Random weights of a real architecture cost the same compute as trained ones, so these measure what
gpt2 and Stable Diffusion 1.5 would (the text is noise and the images coloured noise):
  DIR/gpt2-random   GPT2LMHeadModel(GPT2Config()): gpt2-small, 124M parameters, 12 layers, 768 wide,
                    vocab 50257, fp16 safetensors. Its tokenizer is genq's tiny trained byte-level BPE
                    (workers.tiny.train_tokenizer) with its vocabulary padded by never-merged
                    placeholder tokens `<xN>` to 50257 entries and `<|endoftext|>` moved to id 50256,
                    as in GPT-2: every id the LM head can sample decodes to text, and stop strings
                    (transformers' StopStringCriteria indexes a table by token id) work.
  DIR/sd15-random   a StableDiffusionPipeline with SD 1.5's component configs: UNet (320,640,1280,1280),
                    2 layers per block, cross-attention 768, head dim 8, sample 64; the SD VAE
                    (128,256,512,512), 4 latent channels, sample 512; CLIP ViT-L/14's text encoder
                    (768 wide, 12 layers, 12 heads, MLP 3072, 77 positions, vocab 49408); a CLIP-style
                    BPE tokenizer from workers.tiny (its ~1000 ids all fit below 49408); SD 1.5's PNDM
                    scheduler config; no safety checker; fp16 safetensors.
  DIR/models.toml   registers gpt2-random (text, max_batch_size 64, max_tokens 256) and sd15-random
                    (image, max_batch_size 8, max_size 512, safety_checker false), both dtype float16.

`--small` writes the same formats, tokenizers and vocabularies with tiny layer sizes (seconds on a
CPU), for checking this script and the code paths that use its output without a GPU.
The weights are initialised on `--device` (default: cuda when a GPU is visible), which takes
seconds on a GPU instead of about a minute for the full UNet on a CPU.

Run: python bench/gpu_models.py --out DIR [--small] [--dtype float16|auto|float32] [--device cpu|cuda] [--mute-eos]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import genq's own modules

GPT2_NAME, SD_NAME = "gpt2-random", "sd15-random"
EOS = "<|endoftext|>"  # as workers.tiny.EOS, GPT-2's end-of-text token
GPT2_VOCAB, CLIP_VOCAB = 50257, 49408
HEADER = "# Written by bench/gpu_models.py: random-weight full-size models for offline GPU benchmarks.\n"


def registry_entries(dtype: str) -> dict[str, dict[str, Any]]:
    return {
        GPT2_NAME: {"kind": "text", "source": f"./{GPT2_NAME}", "max_batch_size": 64, "max_tokens": 256,
                    "dtype": dtype},
        SD_NAME: {"kind": "image", "source": f"./{SD_NAME}", "max_batch_size": 8, "max_size": 512,
                  "safety_checker": False, "dtype": dtype},
    }


# --- text: gpt2-small --------------------------------------------------------------------------

def gpt2_tokenizer(vocab_size: int = GPT2_VOCAB) -> Any:
    """genq's trained tiny BPE, its vocabulary padded to `vocab_size` with `<|endoftext|>` last.

    The placeholders are plain vocabulary entries that no merge produces, so encoding is unchanged
    (and as fast as the small BPE); decoding one gives its own text, e.g. `<x4242>`.
    """
    from transformers import GPT2TokenizerFast

    from genq.workers import tiny

    assert tiny.EOS == EOS
    with tempfile.TemporaryDirectory() as tmp:
        tiny.train_tokenizer().save_pretrained(tmp)
        model = json.loads((Path(tmp) / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1]) if t != EOS]
    taken = set(tokens)
    tokens += [p for i in range(len(tokens), vocab_size - 1) if (p := f"<x{i}>") not in taken]
    tokens.append(EOS)
    assert len(tokens) == vocab_size, len(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        return GPT2TokenizerFast.from_pretrained(tmp, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                                 model_max_length=1024)


def build_gpt2(model_dir: Path, *, small: bool, device: str, seed: int = 0, mute_eos: bool = False,
               chat: bool = False, shape: dict[str, int] | None = None) -> Path:
    """gpt2-small (or `small`: 2 layers, 64 wide) with random weights; `mute_eos`: see mute_token.
    `shape`: GPT2Config sizes (n_layer, n_embd, n_head) to use instead, e.g. 6 layers 512 wide.

    `chat`: a chat model as workers.tiny.build_tiny_chat makes one: ChatML's `<|im_start|>` and
    `<|im_end|>` added as special tokens (ids 50257 and 50258, the vocabulary 50259), `<|im_end|>`
    its EOS (the one muted), genq's CHAT_TEMPLATE in its tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from genq.workers.tiny import CHAT_TEMPLATE, IM_END, IM_START

    tokenizer = gpt2_tokenizer()
    bos_id = tokenizer.convert_tokens_to_ids(EOS)
    assert bos_id == GPT2_VOCAB - 1
    if chat:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True) for t in (IM_START, IM_END)], special_tokens=True)
        tokenizer.eos_token = IM_END
        tokenizer.chat_template = CHAT_TEMPLATE
    eos_id = tokenizer.eos_token_id
    sizes = shape or ({"n_embd": 64, "n_layer": 2, "n_head": 4} if small else {})  # else gpt2-small's defaults
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=bos_id, eos_token_id=eos_id, **sizes)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    if mute_eos:
        mute_token(model, eos_id)
    model = model.half().cpu()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def mute_token(model: Any, token_id: int, margin: float = 60.0) -> None:
    """Make a GPT-2 LM practically never sample `token_id` (its EOS), at no change in compute.

    With random weights EOS is as likely as any token (1 in 50257 per step), so some rows of a
    benchmark would stop early and the arms would generate different amounts of text. Here the last
    hidden unit of the final layer norm is pinned to 1 (weight 0, bias 1) and the LM head reads it
    only for `token_id`, with weight -margin: that token's logit drops by `margin` (e^-60 ~ 1e-26
    relative odds), every other logit is unchanged apart from that unit's small share. The head is
    tied to the input embeddings, so that unit of every input embedding becomes 0 (-margin for the
    muted token, which only ever appears as left padding, masked out).
    """
    import torch

    unit = model.config.n_embd - 1
    with torch.no_grad():
        model.transformer.ln_f.weight[unit] = 0.0
        model.transformer.ln_f.bias[unit] = 1.0
        head = model.get_output_embeddings().weight
        head[:, unit] = 0.0
        head[token_id, unit] = -margin


# --- image: Stable Diffusion 1.5 ---------------------------------------------------------------

def sd15_configs(small: bool, bos_id: int, eos_id: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """UNet, VAE and CLIP text encoder configs: SD 1.5's, or the same shapes scaled down."""
    unet: dict[str, Any] = {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "cross_attention_dim": 768, "attention_head_dim": 8,
    }
    vae: dict[str, Any] = {
        "sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu",
        "norm_num_groups": 32, "layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    }
    text: dict[str, Any] = {
        "vocab_size": CLIP_VOCAB, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
    }
    if small:  # diffusers' own test-component sizes
        unet.update(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                    norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        vae.update(sample_size=64, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32)
    return unet, vae, text


def build_sd15(model_dir: Path, *, small: bool, device: str, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from genq.workers.tiny import CLIP_BOS, CLIP_EOS, write_clip_tokenizer_files

    tokenizer_dir = write_clip_tokenizer_files(model_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    assert len(tokenizer) <= CLIP_VOCAB, len(tokenizer)
    bos_id, eos_id = tokenizer.convert_tokens_to_ids(CLIP_BOS), tokenizer.convert_tokens_to_ids(CLIP_EOS)
    unet_config, vae_config, text_config = sd15_configs(small, bos_id, eos_id)
    torch.manual_seed(seed)
    with torch.device(device):
        # Each part goes to fp16 on the CPU as soon as it is built, so the peak is one fp32 UNet.
        unet = UNet2DConditionModel(**unet_config).half().cpu()
        vae = AutoencoderKL(**vae_config).half().cpu()
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).half().cpu()
    scheduler = PNDMScheduler(  # SD 1.5's scheduler config
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


# --- all of it ---------------------------------------------------------------------------------

def build_all(out: Path, *, small: bool = False, dtype: str = "float16", device: str | None = None,
              mute_eos: bool = False) -> dict[str, Any]:
    """Write both models and `out/models.toml`; return what was written and how long it took.
    `mute_eos`: gpt2-random practically never samples EOS (every completion runs to max_tokens)."""
    import torch

    from genq.workers.tiny import write_registry

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    builds: tuple[tuple[str, Any], ...] = ((GPT2_NAME, functools.partial(build_gpt2, mute_eos=mute_eos)),
                                           (SD_NAME, build_sd15))
    for name, build in builds:
        started = time.perf_counter()
        build(out / name, small=small, device=device)
        timings[name] = round(time.perf_counter() - started, 2)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    registry = write_registry(out, registry_entries(dtype))
    text = registry.read_text()
    registry.write_text(HEADER + text.split("\n", 1)[1])
    sizes = {name: sum(f.stat().st_size for f in (out / name).rglob("*") if f.is_file()) for name in timings}
    return {"registry": str(registry), "small": small, "dtype": dtype, "device": device, "mute_eos": mute_eos,
            "build_s": timings, "bytes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the models and models.toml")
    parser.add_argument("--small", action="store_true", help="tiny layer sizes (same formats), for CPU checks")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32", "auto"),
                        help="the dtype models.toml asks workers to load in (weights are stored in fp16)")
    parser.add_argument("--device", default=None, help="where weights are initialised (default cuda if visible)")
    parser.add_argument("--mute-eos", action="store_true",
                        help="gpt2-random practically never samples EOS, so completions run to max_tokens")
    args = parser.parse_args()
    print(json.dumps(build_all(args.out, small=args.small, dtype=args.dtype, device=args.device,
                               mute_eos=args.mute_eos), indent=2))


if __name__ == "__main__":
    main()
