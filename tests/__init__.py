"""Tests for mqtt_persist (a package so that ``from tests.support... import ...`` works)."""
