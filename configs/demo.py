"""The demo: a small multimodal transformer on the offline procedural `shapes` data.

  python -m mmjax.main --config configs/demo.py --workdir /tmp/demo

Each example is a scene of coloured shapes with a caption, a question, a tone (whose
pitch names one shape) and a sensor stream (whose frequencies name one grid cell);
some questions need the image alone, others image + audio, image + sensor or all three
(see mmjax/data/builders/shapes.py). One model learns two tasks at once:

  retrieval  image <-> caption, contrastive (CLIP loss) on the image and caption encoded
             alone; recall@1 in both directions over the 1,000 validation scenes;
  VQA        image + question + audio + sensor fused by `model.fusion` (here: MBT
             bottleneck fusion from the middle layer) and classified over 31 answers.

About 5 minutes on 2 CPU cores (README.md has the measured time and figures), ending
with a summary of both tasks next to their chance levels.
Swap the fusion with `--config.model.fusion=early|late|hybrid|cross|fusion_in_transformer`;
`configs/ablations/fusion.py` compares them all.

`get_config("ablation")` is the cheaper variant the fusion ablation sweeps over.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.errors import ConfigError
from mmjax.train.config import default_config

TEXT_LEN, QUESTION_LEN = 24, 16


def get_config(arg=None):
  config = default_config()
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  # Ends the run with retrieval and VQA next to their chance levels.
  config.summary_hooks = ("mmjax.demo_summary.demo_summary_hook",)

  config.data = pipeline.default_config(
      "shapes", max_text_len=TEXT_LEN, max_question_len=QUESTION_LEN,
      shapes=dict(num_train=20000, num_validation=1000, num_test=1000))

  config.model = ml_collections.ConfigDict(dict(
      name="multimodal",
      modalities=("image", "question", "audio", "sensor"),
      fusion="bottleneck",     # by default from layer num_layers // 2 = 2 (layers 0-1 per
                               # modality, 2-3 through the bottlenecks), 4 bottleneck tokens:
                               # unset, so `--config.model.fusion=...` swaps the strategy
      width=64,
      num_layers=4,
      num_heads=4,
      mlp_dim=256,
      vocab_size=256,          # >= the SentencePiece vocabulary the data prepares
      max_text_len=TEXT_LEN,
      patch_size=8,            # 32x32 images -> 16 patches
      sample_rate=8000,        # shapes audio: 0.25 s at 8 kHz
      frame_length=200,
      hop_length=80,
      num_mel_bins=32,
      audio_patch_size=8,
      sensor_window=4,         # 32 steps -> 8 tokens
      num_answers=31,
      loss_weights={"itc": 1.0, "vqa": 1.0},
      contrastive_loss="softmax",
      contrastive_impl="dense",  # "ring": same loss, no [batch, batch] logits
      embed_dim=64,
      dtype="float32",         # bfloat16 on accelerators
  ))

  config.optimizer.lr = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 100

  if arg == "ablation":
    # Cheaper runs: VQA only (the task fusion changes), smaller batches, fewer steps.
    config.model.loss_weights = {"vqa": 1.0}
    config.batch_size = 64
    config.total_steps = 400
    config.schedule.warmup_steps = 40
    config.eval_every = 0
    config.checkpoint_every = 0
    config.progress_bar = False
  elif arg:
    raise ConfigError(f"configs/demo.py: unknown arg {arg!r}; expected none or 'ablation'.")
  return config
