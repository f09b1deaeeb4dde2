"""Model families behind one interface (:class:`Backbone`), picked by ``model.family``.

The families (``sdxl``, ``cogvideox``) register themselves when :func:`get_backbone_class` first
imports them; importing this package stays cheap (no diffusers pipelines until a model is asked for).
"""

from mpo.backbones.base import Backbone, Embeddings, get_backbone_class, load_backbone, register_backbone

__all__ = ["Backbone", "Embeddings", "get_backbone_class", "load_backbone", "register_backbone"]
