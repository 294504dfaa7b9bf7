"""The test suite (a package, so that ``tests.helpers`` is this one whatever else is installed)."""
