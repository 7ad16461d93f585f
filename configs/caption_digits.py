"""Generated text scored as papers score it, on the offline digits: captioning or generative VQA.

  python -m mmjax.main --config configs/caption_digits.py --workdir /tmp/caption_digits
  python -m mmjax.main --config configs/caption_digits.py:vqa --workdir /tmp/vqa_digits

`caption` (default): an encoder-decoder captioner (image -> caption) on scikit-learn's real
8x8 digits; every evaluation decodes the 297 test captions (greedy; set
`--config.generation.decode=beam`) and logs CIDEr-D / BLEU / ROUGE-L computed as the COCO
toolkit does. `vqa`: the multimodal model answers the digits' questions as generated
text (vqa_mode="generate"), scored with the official VQAv2 accuracy. Both end with the
scores next to a constant baseline (the most frequent reference for every example), and
write the generated texts to DIR/predictions/STEP.jsonl.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

TEXT_LEN, QUESTION_LEN, ANSWER_LEN = 12, 12, 4


def get_config(arg=None):
  if arg not in (None, "caption", "vqa"):
    raise ValueError(f"configs/caption_digits.py: unknown arg {arg!r}; expected 'caption' or 'vqa'.")
  config = default_config()
  config.seed = 0
  config.total_steps = 600
  config.batch_size = 64
  config.eval_batch_size = 128
  config.log_every = 100
  config.eval_every = 300
  config.checkpoint_every = 300

  config.data = pipeline.default_config("digits", max_text_len=TEXT_LEN,
                                        max_question_len=QUESTION_LEN)
  model = dict(
      width=64, num_layers=2, num_heads=4, mlp_dim=128, decoder_layers=2,
      vocab_size=256,            # >= the digits SentencePiece vocabulary
      max_text_len=max(TEXT_LEN, QUESTION_LEN), patch_size=2, dtype="float32")
  if arg == "vqa":
    config.data.max_answer_len = ANSWER_LEN       # the answer's text as `answer_text`
    model.update(name="multimodal", modalities=("image", "question"), fusion="early",
                 loss_weights={"vqa": 1.0}, vqa_mode="generate", max_answer_len=ANSWER_LEN)
  else:
    model.update(name="captioning", modalities=("image",), caption_from=("image",))
  config.model = ml_collections.ConfigDict(model)

  config.generation.decode = "greedy"
  config.optimizer.lr = 1e-3
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 50
  return config
