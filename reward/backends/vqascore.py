"""VQAScore with CLIP-FlanT5: the image-text alignment term of the released image reward.

The release prepends VQAScore (``clip-flant5-xxl``, weight 2.354, the largest of its image weights) to
its 27 gated answers. CLIP-FlanT5 is a CLIP ViT-L/14-336 vision tower, a 2-layer GELU MLP projector and
a Flan-T5 encoder-decoder: the image's patch features (the vision tower's second-to-last layer, CLS
dropped: 576 vectors) are projected to T5's width and spliced into the encoder input where the
``<image>`` placeholder stands, in the conversation::

    A chat between a curious user and an artificial intelligence assistant. The assistant gives
    helpful, detailed, and polite answers to the user's questions. USER: <image>
    Does this figure show "{prompt}"? Please answer yes or no. ASSISTANT:

The score is the model's probability of the answer "Yes" exactly as the release computes it: the
answer is tokenised like any T5 text ("Yes" then ``</s>``), fed to the decoder teacher-forced, and the
score is exp(-mean token cross-entropy), i.e. sqrt(P("Yes") * P(``</s>`` | "Yes")) over the full
vocabulary. Each text chunk around ``<image>`` is tokenised on its own with T5's closing ``</s>``, as
the release does. Images are padded to a square with the image processor's mean colour, then resized
and centre-cropped by the CLIP image processor.

Checkpoint layout (``zhiqiulin/clip-flant5-xxl``, loaded by weight name): ``config.json`` is a T5 config
with ``model_type: clip_t5`` and the multimodal keys ``mm_vision_tower`` (the CLIP checkpoint the tower
was initialised from, which gives its config and image processor), ``mm_hidden_size``,
``mm_projector_type`` (``mlp2x_gelu`` or ``linear``), ``mm_vision_select_layer`` (-2) and
``mm_vision_select_feature`` (``patch``); the weights hold the T5 (``shared``, ``encoder.*``,
``decoder.*``, ``lm_head``), the tower under ``vision_tower.vision_tower.vision_model.*`` and the projector under
``mm_projector.{0,2}.*``. A checkpoint without tower weights gets them from ``mm_vision_tower``, as
the release's loader does. The tokenizer is the checkpoint's, or Flan-T5's of the same size.

Batching: each sample's encoder input is built separately and right-padded (T5's relative attention
makes padding invisible to the real tokens), so a batch scores exactly like one image at a time.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reward.backends import BackendError
from reward.backends.yes_no import check_question_lists
from reward.media import to_uint8
from reward.types import Answers, Sample

MODEL_TYPE = "clip_t5"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
ANSWER = "Yes"
# The release's tokenizer by T5 width, for checkpoints that ship none.
TOKENIZERS = {4096: "google/flan-t5-xxl", 2048: "google/flan-t5-xl"}


class VQAScoreError(BackendError):
    """A CLIP-FlanT5 checkpoint or input that cannot be used; the message names the path or key."""


def conversation(question: str) -> tuple[str, str]:
    """The text before and after the image placeholder (the release's ``t5_chat`` style)."""
    return f"{SYSTEM} USER: ", f"\n{question} ASSISTANT: "


class CLIPFlanT5(nn.Module):
    """CLIP vision tower + projector + Flan-T5; :meth:`score` is VQAScore for a batch (module doc)."""

    def __init__(
        self,
        t5: Any,
        vision: Any,
        projector: nn.Module,
        select_layer: int = -2,
        select_feature: str = "patch",
    ) -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise VQAScoreError(f"mm_vision_select_feature {select_feature!r} is not 'patch' or 'cls_patch'")
        self.t5, self.vision, self.projector = t5, vision, projector
        self.select_layer, self.select_feature = int(select_layer), select_feature

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, patches, d_model]``."""
        hidden = self.vision(pixel_values.to(self.vision.dtype), output_hidden_states=True).hidden_states
        features = hidden[self.select_layer]
        if self.select_feature == "patch":
            features = features[:, 1:]
        return self.projector(features.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def encoder_inputs(
        self, features: torch.Tensor, before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: embed(before) + image features + embed(after), right-padded with zeros."""
        embed = self.t5.get_input_embeddings()
        device = embed.weight.device
        rows = []
        for feats, a, b in zip(features, before, after):
            ids_a = torch.tensor(list(a), dtype=torch.long, device=device)
            ids_b = torch.tensor(list(b), dtype=torch.long, device=device)
            rows.append(torch.cat([embed(ids_a), feats.to(embed.weight.dtype), embed(ids_b)]))
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
        return embeds, mask

    def score(
        self,
        pixel_values: torch.Tensor,
        before: Sequence[Sequence[int]],
        after: Sequence[Sequence[int]],
        answer: Sequence[int],
    ) -> torch.Tensor:
        """exp(-mean cross-entropy of the answer tokens), teacher-forced -> ``[B]`` in (0, 1)."""
        embeds, mask = self.encoder_inputs(self.image_features(pixel_values), before, after)
        labels = torch.tensor([list(answer)] * embeds.shape[0], device=embeds.device)
        start = torch.full_like(labels[:, :1], self.t5.config.decoder_start_token_id)
        decoder_ids = torch.cat([start, labels[:, :-1]], 1)
        logits = self.t5(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        logp = logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        return logp.mean(-1).exp()


class VQAScoreBackend:
    """Answers yes/no questions about images with CLIP-FlanT5's VQAScore (the alignment term)."""

    name = "vqascore"

    def __init__(
        self, model: CLIPFlanT5, tokenizer: Any, image_processor: Any, *, source: str, batch_size: int = 8
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.batch_size = max(1, int(batch_size))
        self.answer_ids = list(tokenizer(ANSWER)["input_ids"])
        mean = getattr(image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        self.background = tuple(int(x * 255) for x in mean)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device | None = None,
        batch_size: int = 8,
    ) -> VQAScoreBackend:
        from reward.backends.vlm import parse_dtype

        path = str(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer, image_processor = load_clip_flant5(path, parse_dtype(dtype), device)
        return cls(model, tokenizer, image_processor, source=path, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Square-padded with the mean colour, then the CLIP image processor (the release's steps)."""
        from PIL import Image

        pictures = []
        for sample in samples:
            if sample.modality != "image":
                raise VQAScoreError(
                    f"sample {sample.id or '?'}: VQAScore ({self.source}) scores images, not videos"
                )
            picture = Image.fromarray(to_uint8(sample.pixels).permute(1, 2, 0).numpy())
            pictures.append(_pad_to_square(picture, self.background))
        out = self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out

    def text_ids(self, question: str) -> tuple[list[int], list[int]]:
        before, after = conversation(question)
        return list(self.tokenizer(before)["input_ids"]), list(self.tokenizer(after)["input_ids"])

    def scores(self, samples: Sequence[Sample], questions: Sequence[str]) -> torch.Tensor:
        """VQAScore of each (image, question) pair -> ``[B]``, in batches of ``batch_size``."""
        if len(samples) != len(questions):
            raise VQAScoreError(f"{len(samples)} samples but {len(questions)} questions")
        parts = []
        with torch.inference_mode():
            for start in range(0, len(samples), self.batch_size):
                batch, texts = (
                    samples[start : start + self.batch_size],
                    questions[start : start + self.batch_size],
                )
                ids = [self.text_ids(q) for q in texts]
                pixels = self.pixel_values(batch).to(self.device)
                parts.append(
                    self.model.score(pixels, [a for a, _ in ids], [b for _, b in ids], self.answer_ids)
                )
        return torch.cat(parts).float().cpu() if parts else torch.empty(0)

    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        """Every question's VQAScore (``[B, Q]``); an alignment question, if given, is scored the same way."""
        q = check_question_lists(samples, questions, alignment_questions, VQAScoreError)
        flat_samples = [s for s, qs in zip(samples, questions) for _ in qs]
        flat = self.scores(flat_samples, [x for qs in questions for x in qs])
        p = flat.view(len(samples), q) if q else torch.empty(len(samples), 0)
        alignment = None if alignment_questions is None else self.scores(samples, alignment_questions)
        return Answers(p_yes=p, alignment=alignment, source=f"vqascore:{self.source}")

    def answer_naive(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
        use_generate: bool = False,
    ) -> Answers:
        """One image at a time (what the release does)."""
        one = VQAScoreBackend(
            self.model, self.tokenizer, self.image_processor, source=self.source, batch_size=1
        )
        return one.answer(samples, questions, alignment_questions)


def _pad_to_square(picture: Any, colour: tuple[int, ...]) -> Any:
    from PIL import Image

    width, height = picture.size
    if width == height:
        return picture
    side = max(width, height)
    square = Image.new(picture.mode, (side, side), colour)
    square.paste(picture, ((side - width) // 2, (side - height) // 2))
    return square


# ---------------------------------------------------------------------------------------- loading
def is_clip_flant5(path: str) -> bool:
    """Whether a checkpoint (local folder or hub id) is a CLIP-FlanT5 (``model_type: clip_t5``)."""
    try:
        return _config(path).get("model_type") == MODEL_TYPE
    except VQAScoreError:
        return False


def _config(path: str) -> dict[str, Any]:
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except OSError as err:
        raise VQAScoreError(f"{path}: cannot read config.json ({err})") from err
    return dict(config)


def load_clip_flant5(path: str, dtype: torch.dtype, device: torch.device) -> tuple[CLIPFlanT5, Any, Any]:
    """Model, tokenizer and image processor from a CLIP-FlanT5 checkpoint in the release layout."""
    from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5Config
    from transformers import T5ForConditionalGeneration as T5

    config = _config(path)
    if config.get("model_type") != MODEL_TYPE:
        raise VQAScoreError(
            f"{path}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r} (CLIP-FlanT5)"
        )
    tower = config.get("mm_vision_tower")
    if not tower:
        raise VQAScoreError(
            f"{path}: config.json has no 'mm_vision_tower' (the CLIP checkpoint of the tower)"
        )
    t5_config = T5Config(**{k: v for k, v in config.items() if not k.startswith("mm_") and k != "model_type"})
    with _quiet():  # the tower and projector weights are "unexpected" to T5; they are loaded below
        t5 = T5.from_pretrained(path, config=t5_config, dtype=dtype, device_map=str(device))
    weights = _read_prefixed(path, ("vision_tower.vision_tower.", "mm_projector."))
    vision_weights = {
        k[len("vision_tower.vision_tower.") :]: v for k, v in weights.items() if k.startswith("vision_")
    }
    try:
        if vision_weights:
            vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tower)).to(dtype)
            _load_exactly(
                vision, _clip_names(vision, vision_weights), f"{path} (vision_tower.vision_tower.*)"
            )
        else:  # the release's loader builds the tower from mm_vision_tower too
            vision = CLIPVisionModel.from_pretrained(tower, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(
            path if (Path(path) / "preprocessor_config.json").is_file() else tower
        )
    except OSError as err:
        raise VQAScoreError(
            f"{path}: cannot load the vision tower {tower!r} named by mm_vision_tower ({err})"
        ) from err
    projector = _projector(config, path)
    _load_exactly(
        projector,
        {k[len("mm_projector.") :]: v for k, v in weights.items() if k.startswith("mm_projector.")},
        f"{path} (mm_projector.*)",
    )
    model = CLIPFlanT5(
        t5,
        vision,
        projector.to(dtype),
        select_layer=config.get("mm_vision_select_layer", -2),
        select_feature=config.get("mm_vision_select_feature", "patch"),
    )
    return model.to(device).eval(), _tokenizer(path, config), image_processor


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _projector(config: dict[str, Any], path: str) -> nn.Module:
    kind = config.get("mm_projector_type", "linear")
    width, hidden = int(config["mm_hidden_size"]), int(config["d_model"])
    if kind == "linear":
        return nn.Linear(width, hidden)
    if kind.startswith("mlp") and kind.endswith("x_gelu") and kind[3:-6].isdigit():
        layers: list[nn.Module] = [nn.Linear(width, hidden)]
        for _ in range(int(kind[3:-6]) - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*layers)
    raise VQAScoreError(f"{path}: mm_projector_type {kind!r} is not 'linear' or 'mlp<N>x_gelu'")


def _tokenizer(path: str, config: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet():  # transformers does not know the model type and says so
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as first:
        fallback = TOKENIZERS.get(int(config.get("d_model", 0)))
        if fallback is None:
            raise VQAScoreError(f"{path}: no tokenizer in the checkpoint ({first})") from first
        try:
            return AutoTokenizer.from_pretrained(fallback)
        except (OSError, ValueError) as err:
            raise VQAScoreError(
                f"{path}: no tokenizer in the checkpoint, and the release's ({fallback}) cannot be loaded ({err})"
            ) from err


def _weight_files(path: str) -> list[Path]:
    """The checkpoint's weight files (safetensors or PyTorch, sharded or not), local or from the hub."""
    local = Path(path)
    names = (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    )
    for name in names:
        file = local / name if local.is_dir() else _hub_file(path, name)
        if file is None or not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            return [file.parent / s if local.is_dir() else _hub_file(path, s) for s in shards]
        return [file]
    raise VQAScoreError(
        f"{path}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def _hub_file(repo: str, name: str) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, name))
    except Exception:  # not in the repo, or no hub: the caller tries the next layout
        return None


def _read_prefixed(path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of ``prefixes`` (only those are read from safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.startswith(prefixes):
                        out[key] = handle.get_tensor(key)
        else:
            try:  # memory-mapped where the file format allows (zip archives), read whole otherwise
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(file, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


def _clip_names(vision: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release saved the tower as ``vision_model.*`` (CLIPVisionModel's layout then); current
    transformers keeps those weights without the prefix. Match whichever the installed one uses."""
    prefixed = any(k.startswith("vision_model.") for k in vision.state_dict())
    bare = {k.removeprefix("vision_model."): v for k, v in state.items()}
    return {f"vision_model.{k}": v for k, v in bare.items()} if prefixed else bare


def _load_exactly(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    expected = set(own)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    # position_ids are a buffer some CLIP versions save and others do not
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise VQAScoreError(
            f"{where}: weights do not match (missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes {shapes[:2]})"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
