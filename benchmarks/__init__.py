"""Benchmarks live in :mod:`aioxen.bench` so installed users get them as ``aioxen bench``;
this package makes ``python -m benchmarks`` work in a checkout."""
