"""The conformance suite every backend must pass, shipped inside the package.

A backend's test file is a few lines::

    from shareit.testing import SharedMappingSuite

    class TestMyBackend(SharedMappingSuite):
        backend = "mybackend"
        options = {}          # extra options for every mapping the suite opens

Capabilities (``SharedMapping.capabilities``), never class names, decide what
a backend skips, and every skip says why. Needs pytest and hypothesis (the
``test`` extra).
"""

from .stateful import mapping_state_machine
from .suite import SharedMappingSuite, join_all, run_children, shareit_files

__all__ = ["SharedMappingSuite", "join_all", "mapping_state_machine", "run_children", "shareit_files"]
