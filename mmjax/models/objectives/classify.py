"""Classification of the fused `modalities` (e.g. MBT's audio-visual classes).

The `modalities` are fused, mean-pooled per modality, combined (`combine`) and classified
over `num_classes` classes by `cls_head` (batch key `label`); one encoder pass serves this
head and VQA's when both are on. Logged `classify_loss` and `classify_accuracy`; evaluation
`classify_accuracy`.
"""
from mmjax.models.objectives.base import (
    Objective, accuracy_summary, classification_features, classification_loss, classifier,
    fused_pooled)
from mmjax.registry import OBJECTIVES


@OBJECTIVES.register("classify")
class Classification(Objective):

  def check(self, model):
    if model.num_classes <= 0:
      raise ValueError(f"Objective 'classify' needs num_classes > 0; got {model.num_classes}.")

  def inputs(self, model):
    return tuple(model.modalities)

  def targets(self, model):
    return ("label",)

  def heads(self, model):
    return {"cls_head": classifier(model, model.num_classes)}

  def combines(self, model):
    return True

  def features(self, model, batch, run):
    return classification_features("classify", model.cls_head(fused_pooled(model, batch, run)),
                                   batch["label"])

  def loss(self, model, features):
    return classification_loss("classify", features)

  @staticmethod
  def summarize(outputs):
    return accuracy_summary("classify", outputs)
