"""Bundled datasets; importing this package registers them in mmjax.registry.DATASETS.

  digits   real 8x8 handwritten digits from scikit-learn, with captions and questions
"""
from mmjax.data.builders import digits  # noqa: F401
