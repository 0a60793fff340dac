"""``python -m hrt_ray`` is the same as the ``hrt-ray`` console script."""

from hrt_ray.cli import main

raise SystemExit(main())
