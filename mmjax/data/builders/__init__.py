"""Bundled datasets; importing this package registers them in mmjax.registry.DATASETS.

  shapes   procedural scenes with captions, questions, audio and sensor streams
  digits   real 8x8 handwritten digits from scikit-learn, with captions and questions
  tfds     any public TFDS dataset prepared as array_record; aliases cifar10, mnist,
           imagenet2012, coco_captions
  coco_files, vqav2_files, image_folder
           your own copy of COCO captions / VQAv2 / ImageNet-style class folders, in
           their own file formats, prepared once without TensorFlow (files.py)
"""
from mmjax.data.builders import digits  # noqa: F401
from mmjax.data.builders import shapes  # noqa: F401
from mmjax.data.builders import public  # noqa: F401
from mmjax.data.builders import coco_files  # noqa: F401
from mmjax.data.builders import vqav2_files  # noqa: F401
from mmjax.data.builders import image_folder  # noqa: F401
