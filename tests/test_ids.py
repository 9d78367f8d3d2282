"""Ids: new ones are safe to use as file names, derived ones are stable, and unsafe ones are refused."""

from __future__ import annotations

import pytest

from shared.models import check_id, checkpoint_id, derived_id, is_safe_id, new_id


def test_ids() -> None:
    assert is_safe_id(new_id()) and len(new_id()) == 24
    assert derived_id("a", "b") == derived_id("a", "b") != derived_id("a", "c")
    assert checkpoint_id("run", 2) != checkpoint_id("run", 3)
    for bad in ("", "..", "a/b", "a\\b", "../x", "x y", "a..b", ".hidden", "é", "x" * 200):
        assert not is_safe_id(bad), bad
        with pytest.raises(ValueError):
            check_id(bad)
