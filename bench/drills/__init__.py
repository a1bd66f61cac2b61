"""Fault drills and scale measurements (issue 14, items 6 and 7): ``scripts/drill``.

Each drill runs against local services — a private PostgreSQL database (or a private cluster),
a private Redis, the Fly Machines fake and the Stripe fake on loopback, worker and control-plane
processes started here — checks its targets (0 lost, 0 doubled, 0 orphans, every instance with a
complete event trail) and returns its figures; :mod:`bench.drills.run` writes them to
``bench/RESULTS-drills.md``. See bench/README.md, "Drills".
"""
