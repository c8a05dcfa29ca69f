"""The manager backend: the conformance suite plus what only a server backend has."""

from shareit.testing import SharedMappingSuite


class TestManager(SharedMappingSuite):
    backend = "manager"
