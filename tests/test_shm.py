"""The shm backend: the conformance suite (its own fault tests are in test_shm_faults.py)."""

from typing import Any, ClassVar

from shareit.testing import SharedMappingSuite


class TestShm(SharedMappingSuite):
    backend = "shm"


class TestShmFloat(SharedMappingSuite):
    """The same contract with unboxed numeric values."""

    backend = "shm"
    options: ClassVar[dict[str, Any]] = {"value_type": "float64"}
