"""Ids: new ones are safe to use as file names, derived ones are stable, and unsafe ones are refused."""

from __future__ import annotations

import os

import pytest

from shared.models import check_id, checkpoint_id, derived_id, is_safe_id, new_id
from shared.randomness import random_token

ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # base32, lowercase


def test_ids() -> None:
    assert is_safe_id(new_id()) and len(new_id()) == 24
    assert derived_id("a", "b") == derived_id("a", "b") != derived_id("a", "c")
    assert checkpoint_id("run", 2) != checkpoint_id("run", 3)
    for bad in ("", "..", "a/b", "a\\b", "../x", "x y", "a..b", ".hidden", "é", "x" * 200):
        assert not is_safe_id(bad), bad
        with pytest.raises(ValueError):
            check_id(bad)


def test_ids_after_fork_differ_from_the_parents() -> None:
    """Random bytes are read ahead in blocks: a forked worker process must not replay its parent's."""
    new_id()  # the parent has bytes read ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, f"{new_id()} {random_token()}".encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    assert child[0] != new_id() and child[1] != random_token()


def test_new_ids_are_cuid2_shaped_unique_and_spread() -> None:
    """Ids are spelled a batch at a time: each one whole, none handed out twice, every first letter used."""
    ids = [new_id() for _ in range(3000)]  # across many batches
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 24 and i[0].isalpha() and i.islower() and set(i) <= set(ALPHABET) for i in ids)
    assert {i[0] for i in ids} == set(ALPHABET[:26])
    assert set("".join(i[1:] for i in ids)) == set(ALPHABET)
