"""Test support that is not a reference implementation: fakes and fixtures."""
