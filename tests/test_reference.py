"""The reference backend (shareit.testing.reference): the full conformance suite.

It runs on the base class's defaults -- the file lock and its undo journal, the
generic incr, transform, edit, snapshot, update and clear -- the path a
third-party backend author takes.
"""

from shareit.testing import SharedMappingSuite


class TestReference(SharedMappingSuite):
    backend = "reference"


class TestReferenceFloat(SharedMappingSuite):
    backend = "reference"
    options = {"value_type": "float64"}  # noqa: RUF012
