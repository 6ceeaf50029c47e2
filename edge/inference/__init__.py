"""Inference: the LiteRT / tflite-runtime interpreter, model manifests, preprocessing
(integer inputs through a lookup table) and the output adapters (classify, yolov8,
ssd, pose), bound together as a ``Model``.

May import ``edge.core`` and ``edge.config``; nothing about cameras or scheduling.
"""
