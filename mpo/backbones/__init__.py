"""Model families behind one interface (:class:`Backbone`), picked by ``model.family``.

A family is found by name (:mod:`mpo.backbones.registry`): the built-in ones are one file each in
this package (``sdxl``, ``cogvideox``, ``wan``, ``sd3``, ``flux``), imported when first asked for, so
importing this package stays cheap (no diffusers pipelines until a model is asked for); a user's
package adds more through the ``mpo.backbones`` entry-point group.
"""

from mpo.backbones.base import Backbone, Embeddings
from mpo.backbones.registry import get_backbone_class, known_families, load_backbone, register_backbone

__all__ = [
    "Backbone",
    "Embeddings",
    "get_backbone_class",
    "known_families",
    "load_backbone",
    "register_backbone",
]
