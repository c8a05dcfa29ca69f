"""The value backend: the conformance suite (capabilities decide its skips)."""

from typing import Any, ClassVar

from shareit.testing import SharedMappingSuite


class TestValue(SharedMappingSuite):
    backend = "value"


class TestValueFloat(SharedMappingSuite):
    backend = "value"
    options: ClassVar[dict[str, Any]] = {"value_type": "float64"}
