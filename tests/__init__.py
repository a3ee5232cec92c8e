"""The test suite (a package, so its modules import ``tests.reference`` and ``tests.support``)."""
