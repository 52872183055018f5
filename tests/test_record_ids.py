"""Row ids: one at a time (CUIDs) and by the thousand for bulk inserts, both of one shape."""

from __future__ import annotations

import re

from storage.records import new_id, new_ids

ID_SHAPE = re.compile(r"[a-z][a-z0-9]{24}")


def test_bulk_ids_look_like_single_ids_and_never_repeat() -> None:
    ids = new_ids(50_000)
    assert len(ids) == 50_000 == len(set(ids))
    assert all(ID_SHAPE.fullmatch(i) for i in ids)
    assert ID_SHAPE.fullmatch(new_id())


def test_bulk_ids_use_every_character_about_evenly() -> None:
    text = "".join(i[1:] for i in new_ids(20_000))  # 480,000 characters after the leading letter
    counts = {c: text.count(c) for c in "0123456789abcdefghijklmnopqrstuvwxyz"}
    expected = len(text) / 36
    assert all(0.8 * expected < n < 1.3 * expected for n in counts.values()), counts
    assert new_ids(0) == []
