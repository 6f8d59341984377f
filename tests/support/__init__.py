"""Test-support kit shared by the test modules (and nothing shipped imports it)."""
