"""The objectives of the multimodal model, one file each, registered by name.

  itc.py       image-text contrastive (CLIP / SigLIP loss), retrieval recall
  itm.py       image-text matching with hard negatives (ALBEF)
  mlm.py       masked language modelling of the caption, fused with the image
  vqa.py       visual question answering: classified over answers, or generated as text
  classify.py  classification of the fused modalities
  caption.py   a causal decoder writes the caption from the fused modalities
  base.py      what an objective is (`Objective`) and the helpers they share

`MultimodalModel(loss_weights={...})` runs the ones named there. A research fork adds one
in its own file with `@OBJECTIVES.register("name")` (mmjax.registry) on an `Objective`
subclass, and names it in `--config.model.loss_weights` once `config.imports` imports it.
"""
from mmjax.models.objectives import caption, classify, itc, itm, mlm, vqa  # noqa: F401  (registers)
from mmjax.models.objectives.base import FeaturePass, Objective

# The order built-ins run in (a fork's objectives run after them, in loss_weights order):
# ITM reads ITC's embeddings, and the order fixes which dropout draws each encoder pass gets.
RUN_ORDER = ("itc", "vqa", "classify", "itm", "mlm", "caption")

__all__ = ["FeaturePass", "Objective", "RUN_ORDER"]
