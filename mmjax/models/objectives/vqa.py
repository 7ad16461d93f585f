"""VQA: answer the question from the fused `modalities`, classified or generated.

`vqa_mode="classify"` (default): the `modalities` (e.g. image + question + audio + sensor)
are fused, mean-pooled per modality, combined (`combine`: concat / sum / gate) and
classified over `num_answers` answers by `vqa_head` (batch key `answer`); logged
`vqa_loss` and `vqa_accuracy`, evaluation `vqa_accuracy`.

`vqa_mode="generate"`: the answer is text. `answer_decoder`, a causal decoder, cross-
attends to the fused tokens of `modalities` and predicts the answer's tokens (batch key
`answer_text`, see config.data.max_answer_len; teacher forcing as captions); logged
`vqa_loss` (nll per token), evaluation `vqa_*` token statistics;
`multimodal.generate_text(task="vqa")` decodes it and config.generation scores it with the
official VQAv2 accuracy.
"""
from mmjax.models.objectives.base import (
    Objective, accuracy_summary, classification_features, classification_loss, classifier,
    fused_pooled, token_features, token_loss, token_summary)
from mmjax.models.objectives.caption import teacher_forcing, text_decoder
from mmjax.registry import OBJECTIVES

VQA_MODES = ("classify", "generate")


@OBJECTIVES.register("vqa")
class VisualQuestionAnswering(Objective):

  def check(self, model):
    if model.vqa_mode not in VQA_MODES:
      raise ValueError(f"Unknown vqa_mode {model.vqa_mode!r}; expected one of {VQA_MODES}.")
    if model.vqa_mode == "classify" and model.num_answers <= 0:
      raise ValueError(f"Objective 'vqa' needs num_answers > 0; got {model.num_answers}.")

  def inputs(self, model):
    return tuple(model.modalities)

  def targets(self, model):
    return ("answer_text",) if self.generates(model) else ("answer",)

  def heads(self, model):
    if self.generates(model):
      return {"answer_decoder": text_decoder(model, model.max_answer_len)}
    return {"vqa_head": classifier(model, model.num_answers)}

  def features(self, model, batch, run):
    if not self.generates(model):
      return classification_features("vqa", model.vqa_head(fused_pooled(model, batch, run)),
                                     batch["answer"])
    memory, memory_mask = self.memory(model, batch, train=run.train)
    inputs, targets = teacher_forcing(batch["answer_text"], batch.get("answer_text_mask"),
                                      model.vocab_size)
    return token_features("vqa", self.logits(model, inputs, memory, memory_mask,
                                             train=run.train), targets)

  def loss(self, model, features):
    if self.generates(model):
      return token_loss("vqa", features)
    return classification_loss("vqa", features)

  @staticmethod
  def summarize(outputs):
    return {**accuracy_summary("vqa", outputs), **token_summary("vqa", outputs)}

  def combines(self, model):
    return not self.generates(model)

  def generates(self, model):
    return model.vqa_mode == "generate"

  def max_len(self, model):
    return model.max_answer_len

  def memory(self, model, batch, train=False):
    """The fused tokens of `modalities` the answer decoder attends to: ([B, N, D], [B, N])."""
    return model.memory(batch, model.modalities, train=train)

  def logits(self, model, tokens, memory, memory_mask, *, train=False, decode=False):
    return model.answer_decoder(tokens, memory, memory_mask, train=train, decode=decode)
