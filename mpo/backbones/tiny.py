"""Tiny random-initialised SDXL and CogVideoX, built in code and loaded like real checkpoints.

They exist so that every stage (generate, score, select, train, eval, export) runs end to end on a
laptop CPU in seconds, through exactly the code a real run uses: the builders write an ordinary
diffusers folder with ``save_pretrained`` and the adapters load it with ``from_pretrained``.
Nothing is downloaded: the configs are written below, the tokenizers are built from vocabularies
written below (CLIP: byte-level BPE; T5: a unigram model), and the weights come from a fixed seed.

A random denoiser's samples are pure noise, and then every candidate decodes to the same grey mush,
so preferences between candidates carry no signal. Before saving, each denoiser is therefore
pretrained briefly (:func:`pretrain_tiny_denoiser`) on synthetic latents, each sample a random
per-channel offset plus unit noise: afterwards candidates differ visibly in colour and brightness,
which the pixel-statistics reward can rank and DPO can move.

Sizes the tiny recipes must use (the VAE downsampling factor is ``2 ** (len(blocks) - 1)``):
- SDXL: VAE factor 2, so ``generate.height = generate.width = 16`` gives 8 x 8 latents.
- CogVideoX: VAE factor 4 in space and 4 in time, so ``height = width = 32`` and ``num_frames = 9``
  give 3 latent frames of 8 x 8.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mpo.backbones.base import Backbone
    from mpo.schema import ModelConfig

SDXL_SIZE = {"height": 16, "width": 16}
COGVIDEOX_SIZE = {"height": 32, "width": 32, "num_frames": 9}
SDXL_PRETRAIN_STEPS = 200
COGVIDEOX_PRETRAIN_STEPS = 150

# Words that get whole-word tokens; anything else is spelt out in byte-level pieces.
_WORD_TEXT = (
    "a the of and in on with photo picture painting video cat dog bird car tree house city street red "
    "blue green yellow white black bright dark night day sky sea sun snow forest mountain flower "
    "person man woman child running walking flying sitting beautiful old small large"
)
_WORDS = tuple(_WORD_TEXT.split())


# ---- tokenizers -------------------------------------------------------------------------------------
def clip_tokenizer():
    """A CLIP byte-level BPE tokenizer: every byte, every byte at a word end, and merges that spell
    the words of ``_WORDS`` whole. 77 positions, like the real one."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:  # left-to-right merges, each a new vocabulary entry
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer(max_length: int):
    """A T5 unigram tokenizer: whole words for ``_WORDS``, single characters for the rest."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys(_WORDS)]
    pieces += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# ---- SDXL ---------------------------------------------------------------------------------------------
def tiny_sdxl_pipeline(seed: int = 0):
    """An SDXL pipeline of about 1M UNet parameters: 32-wide CLIP encoders (concatenated to 64),
    a two-level UNet (32, 64) and a two-level VAE (factor 2, 8 channels per norm group: with one
    channel per group, decoded brightness barely varies between candidates)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,  # SDXL reads the penultimate hidden state
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
        unet = UNet2DConditionModel(
            sample_size=SDXL_SIZE["height"] // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            use_linear_projection=True,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled projection
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=SDXL_SIZE["height"],
            scaling_factor=0.13025,
            force_upcast=False,
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# ---- CogVideoX ----------------------------------------------------------------------------------------
def tiny_cogvideox_pipeline(seed: int = 0):
    """A CogVideoX pipeline: a 2-layer T5 (width 32, 16 text positions), a 2-layer transformer with
    3D rotary embeddings (2 heads of 16), and a 3-level causal 3D VAE (space x4, time x4)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    text_length = 16
    tokenizer = t5_tokenizer(text_length)
    latent_size = COGVIDEOX_SIZE["height"] // 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,  # split 4 / 6 / 6 between time, height and width by the 3D rotary
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=32,
            num_layers=2,
            sample_width=latent_size,
            sample_height=latent_size,
            sample_frames=COGVIDEOX_SIZE["num_frames"],
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=text_length,
            use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(16, 32, 32),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            # Tiling starts above half this size: the tiny videos are decoded whole.
            sample_height=2 * COGVIDEOX_SIZE["height"],
            sample_width=2 * COGVIDEOX_SIZE["width"],
            scaling_factor=1.15258426,
        )
    scheduler = CogVideoXDDIMScheduler(  # the released 2B / 5B scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# ---- pretraining --------------------------------------------------------------------------------------
def pretrain_tiny_denoiser(
    backbone: Backbone,
    steps: int = SDXL_PRETRAIN_STEPS,
    seed: int = 0,
    latent_shape: tuple[int, ...] | None = None,
    batch_size: int = 8,
    learning_rate: float = 2e-3,
) -> list[float]:
    """Teach a random denoiser the distribution "per-channel offset + unit noise" with the backbone's
    own forward process and target (plain denoising, no preferences).

    Prompts are drawn from a few fixed ones (and the empty one), so the network sees the conditioning
    inputs it will get at sampling time. Deterministic given ``seed``: all draws come from a private
    generator, and the caller's global RNG is left as it was. Returns the loss per step.
    """
    from mpo.schema import GenerateConfig

    if latent_shape is None:
        latent_shape = backbone.latent_shape(GenerateConfig(**_default_size(backbone.family)))
    denoiser = backbone.denoiser
    device = next(denoiser.parameters()).device
    prompts = ["", "a photo of a cat", "a red car in the city", "a dark forest at night", "the blue sea"]
    with torch.no_grad():
        table = backbone.encode_prompts(prompts)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    channel_dim = len(latent_shape) - 3  # [C, h, w] or [F, C, h, w]: offsets vary per channel only
    offset_shape = [1] * len(latent_shape)
    offset_shape[channel_dim] = latent_shape[channel_dim]

    params = list(denoiser.parameters())
    was_training, grads = denoiser.training, [p.requires_grad for p in params]
    denoiser.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, foreach=True)
    losses = []
    try:
        for _ in range(steps):
            offset = torch.randn(batch_size, *offset_shape, generator=generator)
            x0 = (offset + torch.randn(batch_size, *latent_shape, generator=generator)).to(device)
            noise = torch.randn(batch_size, *latent_shape, generator=generator).to(device)
            t = torch.randint(0, backbone.num_train_timesteps, (batch_size,), generator=generator).to(device)
            rows = torch.randint(0, len(prompts), (batch_size,), generator=generator).to(device)
            embeds = {key: value[rows] for key, value in table.items()}
            prediction = backbone.predict(denoiser, backbone.add_noise(x0, noise, t), t, embeds)
            loss = torch.nn.functional.mse_loss(prediction.float(), backbone.target(x0, noise, t).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        denoiser.train(was_training)
        for p, flag in zip(params, grads):
            p.requires_grad_(flag)
    return losses


def _default_size(family: str) -> dict[str, int]:
    return {"sdxl": SDXL_SIZE, "cogvideox": COGVIDEOX_SIZE}[family]


# ---- building and saving --------------------------------------------------------------------------------
def is_model_dir(path: str | Path) -> bool:
    """A complete diffusers folder: builds appear by renaming a finished folder into place."""
    return (Path(path) / "model_index.json").is_file()


def save_pipeline_atomically(pipe, path: Path) -> Path:
    """save_pretrained into a temporary sibling, then rename it into place.

    A killed build leaves only a ``.tmp-`` folder, never a half-written model that a later load would
    trust. When two processes race, the loser finds the winner's folder and drops its own copy
    (identical: the build is deterministic).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(tmp)
        try:
            os.rename(tmp, path)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if not is_model_dir(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_dead_builds(path: Path) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>-*`` folders that killed builds of ``path`` left, and only those:
    a build whose process still runs on this machine (another run building the same model) is kept."""
    import psutil

    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


@contextmanager
def _one_thread():
    """Build on one CPU thread: the tensors are too small for a thread pool to pay off, and on a
    shared machine a second thread spinning at every barrier made a build ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_tiny_sdxl(path: str | Path, pretrain_steps: int = SDXL_PRETRAIN_STEPS, seed: int = 0) -> Path:
    """Build, pretrain (a few seconds on CPU) and save the tiny SDXL at ``path``."""
    from mpo.backbones.sdxl import SDXLBackbone

    with _one_thread():
        backbone = SDXLBackbone(tiny_sdxl_pipeline(seed), "cpu")
        pretrain_tiny_denoiser(backbone, steps=pretrain_steps, seed=seed)
    return save_pipeline_atomically(backbone.pipeline(), Path(path))


def build_tiny_cogvideox(
    path: str | Path, pretrain_steps: int = COGVIDEOX_PRETRAIN_STEPS, seed: int = 0
) -> Path:
    """Build, pretrain (about a second on CPU) and save the tiny CogVideoX at ``path``."""
    from mpo.backbones.cogvideox import CogVideoXBackbone

    with _one_thread():
        backbone = CogVideoXBackbone(tiny_cogvideox_pipeline(seed), "cpu")
        pretrain_tiny_denoiser(backbone, steps=pretrain_steps, seed=seed)
    return save_pipeline_atomically(backbone.pipeline(), Path(path))


TINY_BUILDERS: dict[str, Callable[[str | Path], Path]] = {
    "sdxl": build_tiny_sdxl,
    "cogvideox": build_tiny_cogvideox,
}


def ensure_tiny(cfg: ModelConfig) -> None:
    """With ``model.tiny: true``, build the family's tiny model at ``model.path`` unless one is there.

    Called by every adapter's ``load`` before ``from_pretrained``, so a tiny recipe runs from a clean
    clone. A folder that exists but holds something else is refused rather than overwritten.
    """
    if not cfg.tiny:
        return
    path = Path(cfg.path)
    remove_dead_builds(path)  # what killed builds left, whether or not a build happens now
    if is_model_dir(path):
        return
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"model.path={cfg.path!r} exists but holds no diffusers model (no model_index.json); "
            "model.tiny=true builds only into a missing or empty folder"
        )
    if cfg.family not in TINY_BUILDERS:
        raise KeyError(
            f"model.family={cfg.family!r} has no tiny variant (model.tiny=true); known: {sorted(TINY_BUILDERS)}"
        )
    TINY_BUILDERS[cfg.family](path)
