"""Bundled datasets; importing this package registers them in mmjax.registry.DATASETS.

  shapes   procedural scenes with captions, questions, audio and sensor streams
  digits   real 8x8 handwritten digits from scikit-learn, with captions and questions
  tfds     any public TFDS dataset prepared as array_record; aliases cifar10, mnist,
           imagenet2012, coco_captions
"""
from mmjax.data.builders import digits  # noqa: F401
from mmjax.data.builders import shapes  # noqa: F401
from mmjax.data.builders import public  # noqa: F401
