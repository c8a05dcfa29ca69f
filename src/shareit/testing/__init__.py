"""The conformance suite every backend must pass, shipped inside the package.

A backend's test file is a few lines::

    from shareit.testing import SharedMappingSuite

    class TestMyBackend(SharedMappingSuite):
        backend = "mybackend"
        options = {}          # extra options for every mapping the suite opens

Capabilities (``SharedMapping.capabilities``), never class names, decide what
a backend skips, and every skip says why. Needs pytest and hypothesis (the
``test`` extra).

Importing this package registers the ``reference`` backend
(:mod:`shareit.testing.reference`, the template for new backends), so that the
suite's child processes, which import it, can open and clean up its mappings;
``import shareit`` alone does not offer it.
"""

from .. import registry
from .stateful import mapping_state_machine
from .suite import SharedMappingSuite, join_all, run_children, shareit_files

registry.register("reference", "shareit.testing.reference:ReferenceMapping")

__all__ = [
    "SharedMappingSuite", "join_all", "mapping_state_machine", "run_children", "shareit_files",
]
