"""Adding a family needs no edit outside its own file: a family defined here, in a test module (AuraFlow:
UMT5 text encoder, MM-DiT, flow matching, through diffusers' AuraFlowPipeline), is installed the way a
user's package would install it (an entry point in the ``mpo.backbones`` group), and a recipe naming it
runs generate, score, select and a LoRA train step with the project's code as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from mpo.backbones import registry
from mpo.backbones.base import DiffusersBackbone, Embeddings, repeat_rows
from mpo.backbones.registry import UnknownFamily, get_backbone_class
from mpo.backbones.schedules import FlowMatchSchedule
from mpo.config import load_recipe
from mpo.generate import generate_stage
from mpo.score import score_stage
from mpo.select import select_stage
from mpo.store import CandidateStore, RunDir
from mpo.train import train_stage

ROOT = Path(__file__).resolve().parents[1]
NAME = "auraflow-extension"


class AuraFlowBackbone(DiffusersBackbone):
    """AuraFlow: what a user writes to add a family (no decorator needed: the entry point names it)."""

    pipeline_class = AuraFlowPipeline
    denoiser_attr = "transformer"
    modality: ClassVar[Literal["image", "video"]] = "image"
    schedule_class = FlowMatchSchedule
    tiny_size: ClassVar[dict[str, int]] = {"height": 16, "width": 16}
    tiny_pretrain_steps: ClassVar[int] = 30

    def __init__(self, pipe: AuraFlowPipeline, device: torch.device | str = "cpu") -> None:
        super().__init__(pipe, device)
        self._schedule = FlowMatchSchedule.from_scheduler_config(pipe.scheduler.config)

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> AuraFlowPipeline:
        from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
        from transformers import UMT5Config, UMT5EncoderModel

        from mpo.backbones.tiny import t5_tokenizer

        tokenizer = t5_tokenizer(16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = UMT5EncoderModel(
                UMT5Config(
                    vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                )
            )  # fmt: skip
            transformer = AuraFlowTransformer2DModel(
                sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1,
                num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                caption_projection_dim=16, pos_embed_max_size=64,
            )  # fmt: skip
            vae = AutoencoderKL(
                block_out_channels=(16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                scaling_factor=0.2,
            )  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.73)
        return AuraFlowPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )

    @property
    def lora_target_modules(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        embeds, mask, _, _ = self._pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            device=self._device,
            max_sequence_length=16,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def latent_shape(self, gen) -> tuple[int, ...]:
        factor = self._pipe.vae_scale_factor
        return (self._pipe.transformer.config.in_channels, gen.height // factor, gen.width // factor)

    @torch.no_grad()
    def sample(self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen) -> torch.Tensor:
        batch = noise.shape[0]
        embeds, negative = repeat_rows(embeds, batch, "embeds"), repeat_rows(negative, batch, "negative")
        factor = self._pipe.vae_scale_factor
        return self._pipe(
            prompt_embeds=embeds["prompt_embeds"],
            prompt_attention_mask=embeds["prompt_attention_mask"],
            negative_prompt_embeds=negative["prompt_embeds"],
            negative_prompt_attention_mask=negative["prompt_attention_mask"],
            height=noise.shape[-2] * factor,
            width=noise.shape[-1] * factor,
            num_inference_steps=gen.num_inference_steps,
            guidance_scale=gen.guidance_scale,
            latents=noise,
            output_type="latent",
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def call_denoiser(self, denoiser, noisy, model_timesteps, embeds: Embeddings) -> torch.Tensor:
        # AuraFlow's transformer takes t in [0, 1] (the pipeline passes timestep / 1000).
        return denoiser(
            noisy,
            encoder_hidden_states=embeds["prompt_embeds"].to(noisy.dtype),
            timestep=model_timesteps.to(noisy.dtype) / 1000,
            return_dict=False,
        )[0]


def _install(root: Path) -> None:
    """What ``pip install`` of a package declaring the family leaves on sys.path."""
    info = root / "mpo_auraflow_extension-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpo-auraflow-extension\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n{NAME} = {__name__}:{AuraFlowBackbone.__name__}\n"
    )


def test_a_family_from_an_entry_point_generates_and_trains(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    with pytest.raises(UnknownFamily):
        get_backbone_class(NAME)
    _install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        assert get_backbone_class(NAME) is AuraFlowBackbone and AuraFlowBackbone.family == NAME
        out = tmp_path / "run"
        recipe = load_recipe(
            str(ROOT / "recipes" / "tiny" / "sd3.yaml"),
            [
                f"model.family={NAME}",
                f"model.path={tmp_path / 'models' / 'auraflow'}",
                "model.finetune=lora",
                "model.lora_rank=4",
                "train.learning_rate=1e-3",
                f"output_dir={out}",
                "prompts.limit=4",
                "prompts.val_count=1",
                "generate.num_candidates=3",
                "generate.num_inference_steps=2",
                "generate.previews=0",
                "train.max_steps=1",
                "train.batch_size=2",
                "train.checkpoint_every=1",
                "eval.every=0",
                "eval.num_prompts=1",
                "eval.samples_per_prompt=1",
                "tracking.tracker=none",
            ],
        )
        assert generate_stage(recipe)["candidates generated now"] == 4 * 3
        assert (tmp_path / "models" / "auraflow" / "model_index.json").exists()  # the registry built it
        store = CandidateStore(RunDir(out))
        assert store.latents([0], [0]).shape == (1, 4, 8, 8)
        assert set(store.embeddings([0])) == {"prompt_embeds", "prompt_attention_mask"}
        score_stage(recipe)
        select_stage(recipe)
        summary = train_stage(recipe)
        assert summary["steps"] == 1 and summary["final loss"] == summary["final loss"]
        lora = out / "checkpoints" / "step-1" / "weights" / "lora" / "pytorch_lora_weights.safetensors"
        keys = list(load_file(str(lora)))
        assert keys and all(k.startswith("transformer.") and ".lora" in k for k in keys)

    finally:
        registry.unregister_backbone(NAME)
