"""Tiny random-weight LTX-Video and Wan2.1 pipelines, built fully offline.

Tests and local development need checkpoints that the *real* loading code
(`DiffusionPipeline.from_pretrained`) accepts, without downloading gigabytes
from the Hugging Face Hub. Each builder instantiates the genuine diffusers /
transformers classes with miniature configs and `save_pretrained`s them.

The VAEs keep the production compression ratios (LTX: 32x spatial, 8x
temporal; Wan: 8x spatial, 4x temporal), so the tiny models enforce the same
size/frame rules as the real ones: LTX wants multiples of 32 and 8k+1
frames, Wan multiples of 16 and 4k+1 frames. Text encoders get a character
level Unigram tokenizer built with `tokenizers`, so nothing is fetched.

    python -m worker.tiny_models --out models [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TEXT_DIM = 32  # text encoder width == transformer caption/text dim
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5 convention: pad=0, eos=1, unk=2


def _t5_tokenizer(max_length: int):
    """Character-level T5 tokenizer laid out exactly as `T5Tokenizer` rebuilds it on load.

    transformers 5 re-creates T5 tokenizers from the vocab in tokenizer.json
    (Unigram, unk_id=2, WhitespaceSplit+Metaspace), so anything else would not
    survive a save/load round trip.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    vocab = [(tok, 0.0) for tok in SPECIAL_TOKENS] + [(c, -1.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always", split=True)]
    )
    backend.decoder = decoders.Metaspace(prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def _text_encoder_kwargs(vocab_size: int) -> dict:
    """Shared T5/UMT5 encoder shape: 2 layers, width TEXT_DIM, gated-GELU like T5 v1.1."""
    return dict(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_tiny_ltx(out_dir: Path, num_layers: int = 1, num_heads: int = 4, head_dim: int = 8) -> Path:
    """LTX-Video text-to-video pipeline; the folder also loads as the I2V and Condition pipelines.

    A wider or deeper transformer gives a slower model (tests that need time to act mid-job).
    """
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = _t5_tokenizer(max_length=128)
        text_encoder = T5EncoderModel(T5Config(**_text_encoder_kwargs(len(tokenizer))))
        # patch 4 x three 2x space-time downsamples = 32x spatial, 8x temporal (as in LTX-Video).
        vae = AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            patch_size=4,
            patch_size_t=1,
        )
        transformer = LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=num_heads,
            attention_head_dim=head_dim,
            cross_attention_dim=num_heads * head_dim,
            num_layers=num_layers,
            caption_channels=TEXT_DIM,
        )
        # Static shifting: LTXConditionPipeline passes explicit timesteps but no `mu`, which the
        # dynamic-shifting config of the original LTX-Video release would reject.
        scheduler = FlowMatchEulerDiscreteScheduler()
        pipe = LTXPipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        pipe.save_pretrained(out_dir)
    return Path(out_dir)


def _wan_components(*, image_dim: int | None = None) -> dict:
    """Components shared by Wan T2V and I2V; `image_dim` switches the transformer to I2V mode."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer(max_length=512)
    heads, head_dim = 2, 12
    return dict(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(**_text_encoder_kwargs(len(tokenizer)))),
        # Three 2x spatial downsamples, two of them temporal: 8x spatial, 4x temporal.
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        # I2V concatenates 4 mask channels + 16 condition latents onto the 16 noise latents.
        transformer=WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=16 if image_dim is None else 36,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=32,
            num_layers=1,
            image_dim=image_dim,
            # The image embedder outputs the inner width, which the added K/V projections consume.
            added_kv_proj_dim=None if image_dim is None else heads * head_dim,
            rope_max_seq_len=32,
        ),
        # The scheduler the Wan2.1 Diffusers checkpoints ship with.
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )


def build_tiny_wan_t2v(out_dir: Path) -> Path:
    """Wan2.1 text-to-video pipeline; the folder also loads as WanVideoToVideoPipeline."""
    from diffusers import WanPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        WanPipeline(**_wan_components()).save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_wan_i2v(out_dir: Path) -> Path:
    """Wan2.1 image-to-video pipeline with a tiny CLIP vision encoder for the image embedding."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip_dim = 16
        # The pipeline feeds hidden_states[-2], so keep at least two layers.
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=clip_dim,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        )
        image_processor = CLIPImageProcessor(crop_size=32, size=32)
        pipe = WanImageToVideoPipeline(
            **_wan_components(image_dim=clip_dim), image_encoder=image_encoder, image_processor=image_processor
        )
        pipe.save_pretrained(out_dir)
    return Path(out_dir)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "ltx-tiny": build_tiny_ltx,
    "wan-tiny": build_tiny_wan_t2v,
    "wan-i2v-tiny": build_tiny_wan_i2v,
}


def _is_built(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _discard(path: Path) -> None:
    """Move a folder out of the way before deleting it, so nobody sees it half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash.", dir=path.parent))
    try:
        os.replace(path, trash / path.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _build_atomically(build: Callable[[Path], Path], target: Path, force: bool) -> Path:
    """Build into a sibling temp dir and rename it into place; readers never see a partial model."""
    if _is_built(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.build.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would otherwise become the published folder's mode
    try:
        build(staging)
        if target.exists() and (force or not _is_built(target)):
            _discard(target)
        try:
            os.replace(staging, target)
        except OSError:
            # A concurrent caller published first; builds are seeded, so its copy is equivalent.
            if not _is_built(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_all(root: Path, force: bool = False) -> dict[str, Path]:
    """Build every tiny pipeline under `root`, skipping those already present unless `force`."""
    root = Path(root)
    return {name: _build_atomically(build, root / name, force) for name, build in BUILDERS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build tiny random-weight video pipelines offline.")
    parser.add_argument("--out", type=Path, default=Path("models"), help="root folder for the pipelines")
    parser.add_argument("--force", action="store_true", help="rebuild even if a pipeline already exists")
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    # "Writing model shards" bars say nothing for files this small.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for path in build_all(args.out, force=args.force).values():
        print(path)


if __name__ == "__main__":
    main()
