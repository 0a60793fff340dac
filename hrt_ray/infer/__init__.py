"""Inference with a trained checkpoint: batch prediction, pictures for humans, export for other runtimes.

Modules, one per concern:

* :mod:`~hrt_ray.infer.model` -- build the model for a config + checkpoint and run the evaluation
  inference (whole / sliding window / multi-scale, from ``hrt_ray.eval.inference``) on uint8 images;
* :mod:`~hrt_ray.infer.labels` -- train ids -> a dataset's original ids, palette colouring, overlays;
* :mod:`~hrt_ray.infer.predict` -- Ray Data batch inference over a folder/bucket;
* :mod:`~hrt_ray.infer.visualize` -- panels of val samples, also the training loop's TensorBoard panel;
* :mod:`~hrt_ray.infer.export` -- TorchScript / ONNX checked against eager.

Their commands (``hrt-ray predict``/``visualize``/``export``) are the ``*_cli`` modules beside
them: ``hrt-ray --help`` imports every command module, so those import only the config at their
top and the library (torch, Ray) once the command runs.
"""
