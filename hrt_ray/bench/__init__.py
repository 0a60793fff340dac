"""Benchmarks that print figures (speed targets live here, not in tests): ``hrt-ray bench ...``.

One module per benchmark, each with ``run(args) -> int``; their command line is
:mod:`hrt_ray.bench.cli`.
"""
