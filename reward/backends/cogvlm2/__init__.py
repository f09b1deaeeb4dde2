"""A native port of CogVLM2, the architecture of the official VisionReward checkpoints.

VisionReward-Image (CogVLM2-Llama3-19B with the visual expert, SAT layout) and VisionReward-Video
(CogVLM2-Video-Llama3, transformers remote-code layout) run here on this project's transformers and
torch, with no code from the checkpoints executed:

- ``config.py``: the configuration, and the translation from the release's ``config.json``;
- ``vision.py``: the EVA2-CLIP tower and its convolution + GLU adapter;
- ``modeling.py``: the Llama-3 decoder with the visual expert, token types, positions;
- ``inputs.py``: the release's prompt templates, token layout and pixel preprocessing;
- ``loading.py``: the released layouts found and loaded by weight name;
- ``backend.py``: the ``cogvlm2`` answer backend (shared prefix, packed question suffixes);
- ``tiny.py``: tiny random checkpoints in both release layouts, for tests and benchmarks;
- ``verify.py`` / ``remote_runner.py``: ``reward verify``, a parity check against the release's
  remote code where a user can still run it.

The SAT layout is converted by :mod:`reward.convert` (``reward convert``).
"""

from reward.backends.cogvlm2.config import CogVLM2Config, CogVLM2Error
from reward.backends.cogvlm2.loading import detect_layout, is_cogvlm2_checkpoint

__all__ = ["CogVLM2Config", "CogVLM2Error", "detect_layout", "is_cogvlm2_checkpoint"]
