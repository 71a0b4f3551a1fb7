"""Pretrained networks shared by several stages (image embedders for the phantom, metrics, models)."""

from rt_mindeye.nets.efficientnet_lite import (EfficientNetLite, EfficientNetLite0, load_efficientnet_lite,
                                               load_efficientnet_lite0)

__all__ = ["EfficientNetLite", "EfficientNetLite0", "load_efficientnet_lite", "load_efficientnet_lite0"]
