"""Tests of the development tools, apart from the product's suite (make test-tools; CI runs both)."""
