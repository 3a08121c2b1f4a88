"""A user's own DFF model (MobileNetV2-style, output stride 8) exported with dff-trt."""
