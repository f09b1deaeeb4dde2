"""Tiny random-initialised variants of every family, built in code and loaded like real checkpoints.

They exist so that every stage (generate, score, select, train, eval, export) runs end to end on a
laptop CPU in seconds, through exactly the code a real run uses: a family's ``tiny_pipeline`` builds
its pipeline from configs written in code, :func:`build_tiny_pipeline` pretrains its denoiser briefly
and writes an ordinary diffusers folder with ``save_pretrained``, and the family loads it back with
``from_pretrained``. Nothing is downloaded: the tokenizers are built from the vocabularies below (CLIP:
byte-level BPE; T5 / UMT5: a unigram model), and the weights come from a fixed seed.

Only the registry calls :func:`ensure_tiny` (``model.tiny: true``); no production loader builds a
model. This module knows no family by name: each family file carries its own ``tiny_pipeline`` and
``tiny_size``.

A random denoiser's samples are pure noise, and then every candidate decodes to the same grey mush,
so preferences between candidates carry no signal. Before saving, each denoiser is therefore
pretrained briefly (:func:`pretrain_tiny_denoiser`) on synthetic latents, each sample a random
per-channel offset plus unit noise, with the family's own forward process and target: afterwards
candidates differ visibly in colour and brightness, which the pixel-statistics reward can rank and
DPO can move.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mpo.backbones.base import Backbone, DiffusersBackbone
    from mpo.schema import ModelConfig

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


# ---- pretraining --------------------------------------------------------------------------------------
def tiny_t5_config(tokenizer, config_class: type | None = None) -> Any:
    """The tiny T5-family encoder config every family's tests share (T5 for CogVideoX, FLUX and SD3,
    UMT5 for Wan): 2 layers of width 32, relative attention over the tiny prompt length."""
    if config_class is None:
        from transformers import T5Config as config_class
    return config_class(
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


def pretrain_tiny_denoiser(
    backbone: Backbone,
    steps: int = 100,
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
        latent_shape = backbone.latent_shape(GenerateConfig(**(type(backbone).tiny_size or {})))
    denoiser = backbone.denoiser
    device = next(denoiser.parameters()).device
    prompts = ["", "a photo of a cat", "a red car in the city", "a dark forest at night", "the blue sea"]
    with torch.no_grad():
        table = backbone.encode_prompts(prompts)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    channel_dim = backbone.channel_dim  # offsets vary per latent channel only
    offset_shape = [1] * len(latent_shape)
    offset_shape[channel_dim] = latent_shape[channel_dim]

    params = list(denoiser.parameters())
    was_training, grads = denoiser.training, [p.requires_grad for p in params]
    denoiser.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, foreach=True)
    losses = []
    try:
        from tqdm.auto import tqdm

        for _ in tqdm(
            range(steps), desc=f"building tiny {backbone.family}", unit="step", leave=False, mininterval=2
        ):
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


def tiny_flow_vae(sample_size: int, shift_factor: float, seed: int):
    """The tiny 4-channel VAE of the flow image families (SD3, FLUX: they differ in the shift only),
    its decoder fitted so that decoded colour follows the latents."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        # A random VAE's latents are small; 0.2 brings them to unit scale, as the release's
        # factor does for its own (SDXL's tiny VAE uses 0.13 the same way).
        scaling_factor=0.2,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.enable_grad():
        fit_tiny_decoder(vae, (4, 8, 8), seed=seed)
    return vae


def fit_tiny_decoder(
    vae: torch.nn.Module, latent_shape: tuple[int, ...], steps: int = 40, seed: int = 0, lr: float = 3e-3
) -> list[float]:
    """Fit a random VAE's decoder, briefly, to a fixed linear colour map of its latents.

    A random decoder's norms wash out most of the per-channel latent offsets that the pretrained tiny
    denoiser puts in its samples (the Wan VAE's RMS norms all of them): candidates would decode to
    nearly the same colours. After this fit, decoded colour and brightness follow the latents' channel
    means, as a real VAE's do. ``latent_shape`` is ``[C, h, w]`` or ``[C, F, h, w]``, small (the fit
    takes seconds on CPU);
    deterministic given ``seed``; the caller's RNG is untouched. Returns the loss per step.
    """
    generator = torch.Generator().manual_seed(seed)
    channels = latent_shape[0]
    # Each latent channel moves every colour channel together (brightness) and each apart (hue).
    colours = (
        torch.randn(3, channels, generator=generator) + torch.randn(1, channels, generator=generator)
    ) / 2
    params = list(vae.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    was_training, threads = vae.training, torch.get_num_threads()
    vae.train()
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds contention (see _one_thread)
    losses = []
    try:
        for _ in range(steps):
            offset = torch.randn(4, channels, *[1] * (len(latent_shape) - 1), generator=generator)
            z = 0.5 * torch.randn(4, *latent_shape, generator=generator) + offset
            pixels = vae.decode(z, return_dict=False)[0]
            rgb = torch.einsum("oc,bc...->bo...", colours, z)
            target = torch.tanh(torch.nn.functional.interpolate(rgb, size=pixels.shape[2:], mode="nearest"))
            loss = torch.nn.functional.mse_loss(pixels, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        vae.train(was_training)
        torch.set_num_threads(threads)
    return losses


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


def build_tiny_pipeline(
    cls: type[DiffusersBackbone], path: str | Path, pretrain_steps: int, seed: int = 0
) -> Path:
    """Build ``cls.tiny_pipeline(seed)``, pretrain its denoiser (seconds on CPU) and save it at ``path``."""
    with _one_thread():
        backbone = cls(cls.tiny_pipeline(seed), "cpu")
        if pretrain_steps > 0:
            pretrain_tiny_denoiser(backbone, steps=pretrain_steps, seed=seed)
    return save_pipeline_atomically(backbone.pipeline(), Path(path))


def ensure_tiny(cls: type[Backbone], cfg: ModelConfig) -> None:
    """Build the family's tiny model at ``model.path`` unless one is there (``model.tiny: true``).

    A folder that exists but holds something else is refused rather than overwritten.
    """
    path = Path(cfg.path)
    remove_dead_builds(path)  # what killed builds left, whether or not a build happens now
    if is_model_dir(path):
        return
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"model.path={cfg.path!r} exists but holds no diffusers model (no model_index.json); "
            "model.tiny=true builds only into a missing or empty folder"
        )
    from mpo.logs import get_logger

    get_logger(__name__).info(
        "model.tiny: building the tiny random-initialised %s at %s (once; later runs load it)",
        cfg.family,
        path,
    )
    cls.build_tiny(path)
