"""Ray Tune sweeps over HRT experiments (``hrt-ray tune``): window size x learning rate ablations.

- :mod:`hrt_ray.tune.config`: the typed sweep config (base experiment + search space + scheduler).
- :mod:`hrt_ray.tune.trial`: one trial = one whole Ray Train run, reporting to Tune.
- :mod:`hrt_ray.tune.sweep`: pre-flight checks, the ``Tuner`` (ASHA or FIFO), resume.
- :mod:`hrt_ray.tune.results`: the results table (printed, CSV, Markdown) and the plot.

Nothing here imports torch or Ray at package import time (the CLI answers fast).
"""
