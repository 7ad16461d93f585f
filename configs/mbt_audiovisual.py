"""MBT: audio-visual classification with attention bottlenecks (Nagrani et al. 2021,
"Attention Bottlenecks for Multimodal Fusion"), the VGGSound setup.

  python -m mmjax.main --config configs/mbt_audiovisual.py --workdir gs://BUCKET/mbt

A ViT-B encoder per modality (12 layers, 768 wide, 12 heads; separate weights, as MBT's
`share_encoder=False`) over RGB tubelets and log-mel spectrogram patches. Layers 0-7 see
one modality each; from layer 8 on the two streams exchange information only through 4
shared bottleneck tokens (MBT's best setting, `fusion_layer=8`, `num_bottlenecks=4`).
8 frames at 224x224 cut into 2x16x16 tubelets (MBT's 3D-conv patches of 2 frames);
8 s of 16 kHz audio as a 128-bin log-mel spectrogram (25 ms windows, 10 ms hop) cut into
16x16 patches. Stochastic depth grows linearly with depth to 0.3 in the last layer, as
MBT's `stochastic_droplayer_rate`. The per-modality mean-pooled outputs are summed and
classified over VGGSound's 309 classes. SGD with momentum 0.9, peak lr 0.5, 2.5 warmup
epochs then cosine decay, gradient clipping at norm 1, no weight decay, batch 64, 50
epochs of ~170k clips. MBT initialises both streams from ImageNet-21k ViT-B/16: set
`--config.init_from.checkpoint=PATH` (see mmjax/convert for importers). Not here: MBT's
mixup (alpha 0.5), label smoothing (0.3), SpecAugment and multi-clip evaluation.

Data: VGGSound is not in the TFDS catalogue; prepare it as a TFDS array_record dataset
with `video` (uint8 [8, H, W, 3]), `audio` (int16 [128000]) and `label` features and
select it with `--config.data.tfds.tfds_name=NAME` (see mmjax/data/builders/public.py).
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

VGGSOUND_TRAIN_CLIPS = 172_427
NUM_CLASSES = 309


def get_config(arg=None):
  del arg
  config = default_config()
  config.seed = 0
  config.batch_size = 64
  config.total_steps = 50 * VGGSOUND_TRAIN_CLIPS // config.batch_size
  config.eval_batch_size = 64
  config.log_every = 50
  config.eval_every = 5000
  config.checkpoint_every = 2000

  config.data = pipeline.default_config(
      "tfds", image_size=224,
      tfds=dict(tfds_name="vggsound", eval_split="test",
                   fields={"video": "video", "audio": "audio", "label": "label"},
                   # 8 frames and 8 s of 16 kHz audio, as stored: what `mmjax.aot`
                   # compiles for without the data.
                   declared={"video": [(8, 256, 256, 3), "uint8"],
                             "audio": [(128_000,), "int16"], "label": [(), "int64"]}),
      preprocess="decode('video')|resize(224, key='video')|"
                 "normalize(0.5, 0.5, key='video')|decode('audio')|"
                 "keep('video', 'audio', 'label')",
      eval_preprocess="decode('video')|resize(224, key='video')|"
                      "normalize(0.5, 0.5, key='video')|decode('audio')|"
                      "keep('video', 'audio', 'label')")

  config.model = ml_collections.ConfigDict(dict(
      name="multimodal",
      modalities=("video", "audio"),
      loss_weights={"classify": 1.0},
      num_classes=NUM_CLASSES,
      fusion="bottleneck",
      fusion_layer=8,
      num_bottlenecks=4,
      width=768, num_layers=12, num_heads=12, mlp_dim=3072,
      video_patch_size=(2, 16, 16),   # tubelets of 2 frames x 16 x 16, as MBT
      sample_rate=16_000, frame_length=400, hop_length=160, num_mel_bins=128,
      audio_patch_size=16,
      combine="sum",
      dropout_rate=0.0,
      droppath_rate=0.3,              # in the last layer, 0 in the first (linear, as MBT)
      droppath_schedule="linear",
      dtype="float32",                # bfloat16 on accelerators
  ))

  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.5
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.clip_grad_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = int(2.5 * VGGSOUND_TRAIN_CLIPS / config.batch_size)
  return config
