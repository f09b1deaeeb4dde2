"""The model side of reward training: the VLM, what of it trains (LoRA or full), and its answers.

:class:`AnswerModel` is the trained module: a transformers VLM plus the scorer's own rendering. Its
forward asks every question of a batch of samples exactly as :class:`reward.backends.vlm.VLMBackend`
scores them (same chat template, same shared-prefix split, same positions, same answer position), so
training and scoring cannot drift apart: the scorer's functions are called, not re-implemented.

Train-time prefix sharing and its gradient. A sample's questions share a token prefix (system turn,
user turn start, the visual tokens). The prefix runs once per sample, filling a key/value cache; the
cache is repeated once per question row and every question's suffix runs as one batch over it. In the
backward pass each row's gradient with respect to its copy of the prefix keys/values flows back through
the repeat (whose backward sums the copies) into the one prefix pass, and from there into the vision
tower and the prefix tokens: the shared part receives the sum over questions of each question's
gradient. Because attention is causal, the prefix activations do not depend on which question follows,
so this sum is exactly the gradient of asking each question in its own full forward (tested equal in
float32), at the cost of one prefix forward and backward instead of one per question. The prefix
passes are the scorer's own (:meth:`reward.backends.vlm.VLMBackend.prefix_passes`), so where a
right-padded prefix would shift a sliding window (Gemma 3) training runs one sample per pass exactly
as scoring does; the processes of a run agree on that per step, since under DeepSpeed ZeRO-3 they
must run the same forwards.

Where gradient checkpointing is wanted: transformers turns the key/value cache off inside checkpointed
decoder layers, which the shared prefix needs, so it is not offered here (at 2B scale the activations
of one prefix and its question rows fit without it).

Fine-tuning modes are objects (:class:`LoraFinetune`, :class:`FullFinetune`) holding what differs:
which parameters train, how a checkpoint's weights are written and read back, and the export.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from reward.backends.vlm import VLMBackend, VLMError, checked_processor, load_processor, repeat_cache_rows
from reward.backends.vlm import parse_dtype as vlm_dtype
from reward.backends.yes_no import answer_token_ids
from reward.errors import RewardInputError
from reward.types import Sample

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
PROCESSOR_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


class ModelSetupError(RewardInputError):
    """A model or a setting the trainer cannot use; the message names the key or the path."""


# ---- loading ----------------------------------------------------------------------------------------
def load_vlm(cfg: Any, device: torch.device | str) -> tuple[nn.Module, Any]:
    """The base VLM and its processor (the tiny Qwen2-VL is built at ``model.path`` if asked for)."""
    from transformers import AutoModelForImageTextToText

    path = Path(str(cfg.path)).expanduser()
    if cfg.tiny and not (path / "config.json").exists():
        from reward.backends.tiny_vlm import build_tiny_qwen2_vl

        build_tiny_qwen2_vl(path)
    source = str(path) if path.exists() else str(cfg.path)
    processor = checked_processor(source)  # fails before the weights load
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=vlm_dtype(cfg.dtype), attn_implementation=cfg.attention
    )
    return model.to(device), processor


def scorer_for(
    model: nn.Module, processor: Any, cfg: Any, source: str, max_frames: int, batch: int
) -> VLMBackend:
    """The scorer over the live model (it renders and splits for training, and scores the held-out set)."""
    return VLMBackend(
        model,
        processor,
        source=source,
        batch_size=batch,
        max_frames=max_frames,
        answer_reduce=cfg.answer_reduce,
    )


def taught_tokens(backend: VLMBackend, words: list[str]) -> tuple[int, int]:
    """Token ids of ``train.answer_words``: each one token, and one the scorer reads as yes / no."""
    ids = []
    for word, side, allowed in zip(words, ("yes", "no"), (backend.yes_ids, backend.no_ids)):
        encoded = answer_token_ids(backend.tokenizer, [word])
        if not encoded:
            raise ModelSetupError(f"train.answer_words: {word!r} is not a single token of this vocabulary")
        if encoded[0] not in allowed:
            raise ModelSetupError(
                f"train.answer_words: {word!r} is not a '{side}' spelling the scorer reads "
                f"(reward.backends.yes_no.{side.upper()}_SPELLINGS)"
            )
        ids.append(encoded[0])
    return ids[0], ids[1]


# ---- the trained module -----------------------------------------------------------------------------
class AnswerModel(nn.Module):
    """The VLM with the scorer's rendering: ``forward(samples, questions)`` -> ``[rows, vocab]`` logits
    at every question's answer position (rows: the samples' questions in order). See the module doc
    for how the gradient flows through the shared prefix. ``agree`` makes the processes of a run take
    the sliding-window decision together (:meth:`VLMBackend.prefix_passes`)."""

    def __init__(
        self, vlm: nn.Module, backend: VLMBackend, agree: Callable[[bool], bool] | None = None
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.backend = backend
        self.agree = agree

    def forward(self, samples: list[Sample], questions: list[list[str]]) -> torch.Tensor:
        states = []
        for cache, mask, start, suffixes in self.backend.prefix_passes(samples, questions, self.agree):
            repeat_cache_rows(cache, [len(s) for s in suffixes])
            states.append(self.backend.suffix_states(cache, mask, start, suffixes))
        return self.vlm.get_output_embeddings()(torch.cat(states))


def one_question_at_a_time(
    backend: VLMBackend, samples: list[Sample], questions: list[list[str]]
) -> torch.Tensor:
    """The reference the shared prefix is checked against: every question in its own full forward
    (the visual re-encoded each time) -> ``[rows, vocab]`` answer-position logits."""
    rows = [backend.full_pass_logits(s, q) for s, qs in zip(samples, questions) for q in qs]
    return torch.cat(rows)


# ---- fine-tuning modes ------------------------------------------------------------------------------
def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{name}" for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ModelSetupError(f"{type(model).__name__}: cannot find its {type(target).__name__}")


def default_lora_targets(model: nn.Module, train_vision: bool) -> list[str]:
    """Every linear layer of the language model (and, with ``train_vision``, every other one except
    the output head), named by full path so that no family-specific names are needed."""
    head = model.get_output_embeddings()
    decoder_path = _path_of(model, model.get_decoder())
    names = _linear_names(model.get_decoder(), decoder_path + ".")
    if train_vision:
        inside = set(names)
        names += [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n not in inside and m is not head
        ]
    return names


class LoraFinetune:
    """LoRA adapters through peft; the base stays frozen. Checkpoints hold the adapter only."""

    name = "lora"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.peft_model: Any = None

    def prepare(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = list(self.cfg.lora_target_modules or default_lora_targets(model, self.cfg.train_vision))
        config = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=targets,
        )
        try:
            self.peft_model = get_peft_model(model, config)
        except ValueError as err:
            raise ModelSetupError(
                f"model.lora_target_modules={targets[:4]}...: cannot attach LoRA ({err})"
            ) from err
        return self.peft_model.get_base_model()

    def _peft_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict of the trained module (keys ``vlm.*``) in the PeftModel's key layout."""
        return {f"base_model.model.{k[len('vlm.') :]}": v for k, v in state.items() if k.startswith("vlm.")}

    def save(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        self.peft_model.save_pretrained(folder / ADAPTER_DIR, state_dict=self._peft_state(state))

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        path = folder / ADAPTER_DIR / "adapter_model.safetensors"
        if not path.exists():
            raise ModelSetupError(f"{path}: missing")
        result = set_peft_model_state_dict(self.peft_model, load_file(str(path)))
        if getattr(result, "unexpected_keys", None):
            raise ModelSetupError(
                f"{path}: does not match the adapter (unexpected {result.unexpected_keys[:3]})"
            )

    def export(
        self, weights: Path, out: Path, merge: bool, base_path: str, load_base: Callable[[], nn.Module]
    ) -> None:
        """The adapter of ``weights`` on a freshly loaded base: merged into its weights, or kept beside
        them (base weights + ``adapter_config.json`` + ``adapter_model.safetensors``: transformers
        loads such a folder as the base with its adapter attached)."""
        from peft import PeftModel

        base = load_base()
        if not merge:
            base.save_pretrained(out)
        tuned = PeftModel.from_pretrained(base, str(weights / ADAPTER_DIR))
        if merge:
            tuned.merge_and_unload().save_pretrained(out)
            return
        tuned.save_pretrained(out)
        config = json.loads((out / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_path  # where the base came from (the folder holds it too)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


class FullFinetune:
    """Every weight of the language model (and the vision tower with ``train_vision``) trains."""

    name = "full"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        head = model.get_output_embeddings()
        for part in (model.get_decoder(), head, model.get_input_embeddings()):
            part.requires_grad_(True)
        if self.cfg.train_vision:
            model.requires_grad_(True)
        self.model = model
        return model

    @staticmethod
    def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("vlm.") :]: v for k, v in state.items() if k.startswith("vlm.")}

    def save(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        self.model.save_pretrained(folder / MODEL_DIR, state_dict=self._strip(state))

    def load(self, folder: Path) -> None:
        files = sorted((folder / MODEL_DIR).glob("*.safetensors"))
        if not files:
            raise ModelSetupError(f"{folder / MODEL_DIR}: no safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(load_file(str(path)))
        result = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ModelSetupError(
                f"{folder / MODEL_DIR}: does not match the model (missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]})"
            )

    def export(
        self, weights: Path, out: Path, merge: bool, base_path: str, load_base: Callable[[], nn.Module]
    ) -> None:
        del merge, base_path, load_base  # a full fine-tune is whole weights already
        shutil.copytree(weights / MODEL_DIR, out, dirs_exist_ok=True)


def finetune_mode(cfg: Any) -> LoraFinetune | FullFinetune:
    return LoraFinetune(cfg) if cfg.finetune == "lora" else FullFinetune(cfg)


def save_processor(processor: Any, source: str, out: Path) -> None:
    """Write what the vlm backend's ``load_processor`` reads (tokenizer, image/video processor
    settings, chat template) into ``out``: the processor's own save, plus the source's small files."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(out)
    else:  # reward.backends.vlm.Qwen2VLParts (no torchvision): its parts
        processor.tokenizer.save_pretrained(out)
        processor.image_processor.save_pretrained(out)
        if processor.chat_template:
            (out / "chat_template.jinja").write_text(processor.chat_template)
    src = Path(source)
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


def check_export(out: Path) -> None:
    """The export must load through the reward's own loader (what `reward.model_path` does)."""
    try:
        load_processor(str(out))
    except (OSError, ValueError, VLMError) as err:
        raise ModelSetupError(f"{out}: the exported processor does not load ({err})") from err
