"""Tests for gcmlm_assets."""
