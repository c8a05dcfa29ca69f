"""``shareit bench``: every backend against baselines and peer libraries on this machine.

- ``subjects``: what is measured (backends, baselines, peers) and its capabilities
- ``workloads``: what is done to it, as data: titles, units, sizes, classes of use
- ``timing``: medians of repeats, parallel forked runs
- ``runner``: the plan of measurements, peers each in a subprocess of their own
- ``verdict``: the backend recommended per class of use
- ``present``: progress bar, tables, recommendations and chart
- ``command``: the ``shareit bench`` command itself
"""
