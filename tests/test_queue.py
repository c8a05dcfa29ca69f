"""The queue backend: the conformance suite."""

from shareit.testing import SharedMappingSuite


class TestQueue(SharedMappingSuite):
    backend = "queue"
