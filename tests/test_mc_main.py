"""The MC process entry point's garbage-collector tuning (``tune_gc``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from darktower.mc.__main__ import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Process-wide settings: put back what the test session had."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_gc_freezes_start_up_objects_and_raises_only_the_young_threshold(
    restored_gc: None,
) -> None:
    _, older, oldest = gc.get_threshold()
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() > 0
    # Cyclic garbage is still collected.
    assert gc.isenabled()
