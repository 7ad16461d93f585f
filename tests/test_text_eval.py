"""Evaluation that generates (captions, generative VQA) and zero-shot classification, run by
the trainer on tiny models over the offline digits."""
import json

import ml_collections
import numpy as np
import pytest

from configs import caption_digits
from mmjax import metrics
from mmjax.data import pipeline
from mmjax.models import multimodal, two_tower  # noqa: F401  (register the models)
from mmjax.models.base import build_model
from mmjax.train import text_eval, trainer, zeroshot
from mmjax.train.config import default_config

TINY_RUN = dict(eval_every=0, checkpoint_every=0, progress_bar=False, log_every=1,
                schedule=dict(warmup_steps=0, name="cosine", end_lr_fraction=0.0, timescale=0),
                eval_batch_size=304)  # the 297 test digits in one batch (7 padding rows)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("datasets"))


def test_generation_inside_evaluation_scores_and_writes_predictions(data_dir, tmp_path, capsys):
  """Captions and generated answers in one run: the logged scores are the metrics of the
  written predictions, next to the most-frequent-reference baseline."""
  config = caption_digits.get_config("vqa")
  config.update(total_steps=2, batch_size=16, **TINY_RUN)
  config.data.data_dir = data_dir
  config.model.update(loss_weights={"caption": 1.0, "vqa": 1.0}, width=16, num_layers=1,
                      num_heads=2, mlp_dim=32, decoder_layers=1)
  config.generation.decode = "greedy"  # beam search is tested in test_decoding.py
  results = trainer.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "predictions" / "2.jsonl") as f:
    lines = [json.loads(line) for line in f]
  for task in ("caption", "vqa"):
    rows = [r for r in lines if r["task"] == task]
    assert sorted(r["id"] for r in rows) == list(range(297))  # every example once, no padding
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    if task == "caption":
      want = metrics.caption_scores(preds, refs, java_metrics=False)
      for k in ("cider", "bleu4", "rouge_l"):
        assert results[f"eval/{k}"] == pytest.approx(want[k], rel=1e-9)
    else:
      assert results["eval/vqa_accuracy"] == pytest.approx(metrics.vqa_accuracy(preds, refs))
  refs = pipeline.get_dataset(config.data).references("test", "caption")
  common = max({r[0] for r in refs}, key=lambda c: sum(r[0] == c for r in refs))
  baseline = metrics.caption_scores([common] * len(refs), refs, java_metrics=False)
  assert results["eval/baseline_cider"] == pytest.approx(baseline["cider"], rel=1e-9)
  assert results["eval/generation_seconds"] > 0
  summary = capsys.readouterr().out
  assert "generated text vs. a constant baseline" in summary and "VQA accuracy" in summary


def test_generation_and_zeroshot_config_errors_are_named():
  config = caption_digits.get_config()
  model = build_model(config.model)
  config.generation.decode = "sample"
  with pytest.raises(ValueError, match="generation.decode='sample'"):
    text_eval.GenerationEvaluator(config, model, None, None, "", None)
  config.generation.update(decode="greedy", beam_width=2)
  with pytest.raises(ValueError, match=r"Unknown config.generation keys \['beam_width'\]"):
    text_eval.GenerationEvaluator(config, model, None, None, "", None)
  del config.generation["beam_width"]
  vqa = build_model(ml_collections.ConfigDict(dict(
      name="multimodal", modalities=("image", "question"), loss_weights={"vqa": 1.0},
      num_answers=12)))
  with pytest.raises(ValueError, match="generates no text"):
    text_eval.GenerationEvaluator(config, vqa, None, None, "", None)
  with pytest.raises(ValueError, match="no class_embeddings"):
    zeroshot.ZeroShotEvaluator(config, object(), None, None)  # e.g. a ViT classifier
  config.zeroshot.prompts = ("a photo",)
  with pytest.raises(ValueError, match="templates"):
    zeroshot.ZeroShotEvaluator(config, vqa, None, None)


def test_zeroshot_two_tower_on_digits_beats_chance(data_dir, tmp_path):
  """A tiny CLIP trained on digit captions classifies digits from class-name prompts."""
  config = default_config()
  config.update(total_steps=150, batch_size=64, **TINY_RUN)
  config.data = pipeline.default_config("digits", data_dir=data_dir, max_text_len=8)
  config.model = ml_collections.ConfigDict(dict(
      name="two_tower", vocab_size=256, embed_dim=32, patch_size=4, image_width=32,
      image_depth=1, image_heads=2, text_width=32, text_depth=1, text_heads=2, max_text_len=8))
  config.optimizer.lr = 3e-3
  config.schedule.warmup_steps = 10
  config.zeroshot.update(enabled=True, prompts=("a handwritten {}", "the digit {}"))
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["eval/zeroshot_chance"] == 0.1
  assert results["eval/zeroshot_accuracy"] > 0.2


def test_zeroshot_evaluator_equals_direct_prompt_ensemble_multimodal(data_dir):
  """eval/zeroshot_accuracy of the multimodal model equals CLIP's recipe written out."""
  import flax.linen as nn
  import jax
  from mmjax.data import tokenizer as tokenizer_lib
  from mmjax.train import sharding as sharding_lib
  config = default_config()
  config.eval_batch_size = 304
  config.data = pipeline.default_config("digits", data_dir=data_dir, max_text_len=8)
  config.model = ml_collections.ConfigDict(dict(
      name="multimodal", loss_weights={"itc": 1.0}, vocab_size=256, width=16, num_layers=1,
      num_heads=2, mlp_dim=32, embed_dim=16, max_text_len=8, patch_size=4))
  prompts = ("a handwritten {}", "the digit {}")
  config.zeroshot.update(enabled=True, prompts=prompts)
  model = build_model(config.model)
  batch = next(iter(pipeline.create_eval_iterator(config.data, global_batch_size=304)))
  params = nn.meta.unbox(model.init(jax.random.key(0), {k: batch[k][:2] for k in ("image", "text")},
                                    method="loss")["params"])
  mesh = sharding_lib.make_mesh(config.mesh)
  got = zeroshot.ZeroShotEvaluator(config, model, sharding_lib.replicated(mesh), mesh)(params, 0)

  tok = pipeline.data_tokenizer(config.data)
  names = pipeline.dataset_info(config.data)["classes"]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  classes = []
  for name in names:
    ids = np.stack([tok.encode_padded(p.format(name), 8) for p in prompts])
    text = np.asarray(model.apply({"params": params}, {"text": ids}, method="embed_text"))
    classes.append(unit(unit(text).mean(0)))
  image = np.asarray(model.apply({"params": params}, {"image": batch["image"]},
                                 method="embed_image"))
  valid = batch["valid"]
  want = np.mean((np.argmax(image @ np.stack(classes).T, -1) == batch["label"])[valid])
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
  assert got["zeroshot_accuracy"] == pytest.approx(want)
