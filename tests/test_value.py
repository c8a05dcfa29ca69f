"""The value backend: the conformance suite (capabilities decide its skips)."""

from shareit.testing import SharedMappingSuite


class TestValue(SharedMappingSuite):
    backend = "value"


class TestValueFloat(SharedMappingSuite):
    backend = "value"
    options = {"value_type": "float64"}
