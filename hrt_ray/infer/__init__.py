"""Inference with a trained checkpoint: batch prediction, pictures for humans, export for other runtimes.

Modules, one per concern:

* :mod:`~hrt_ray.infer.model` -- build the model for a config + checkpoint and run the evaluation
  inference (whole / sliding window / multi-scale, from ``hrt_ray.eval.inference``) on uint8 images;
* :mod:`~hrt_ray.infer.labels` -- train ids -> a dataset's original ids, palette colouring, overlays;
* :mod:`~hrt_ray.infer.predict` -- ``hrt-ray predict``: Ray Data batch inference over a folder/bucket;
* :mod:`~hrt_ray.infer.visualize` -- ``hrt-ray visualize`` and the training loop's TensorBoard panel;
* :mod:`~hrt_ray.infer.export` -- ``hrt-ray export``: TorchScript / ONNX checked against eager.

Nothing here imports torch or Ray at module top (the CLI must answer ``--help`` fast).
"""
