"""The full-screen `shmbroker top` layout (shmbroker/monitor/views.py), without a terminal:
what each view shows, that every size fits, and what each key does."""
from __future__ import annotations

import dataclasses

import pytest

from shmbroker.monitor.snapshot import GroupRow, PartitionRow, ProcessRow, Snapshot
from shmbroker.monitor.views import (VIEWS, LagTrend, ViewState, layout, trend_text)


def snapshot(partitions=None, groups=None, errors=()) -> Snapshot:
    processes = [ProcessRow("supervisor", "supervisor", 10, "running", 0, 0.0, 30 << 20, 2),
                 ProcessRow("coordinator", "coordinator", 11, "running", 0, 2.0, 40 << 20, 4),
                 ProcessRow("partition", "partition busy/0", 12, "running", 0, 55.0, 50 << 20, 2),
                 ProcessRow("partition", "partition quiet/0", 13, "running", 1, 0.5, 45 << 20, 2)]
    if partitions is None:
        partitions = [PartitionRow("busy", 0, 310_000, 0, 12_400.0, 40 << 20, 1.3e6, 2, 1),
                      PartitionRow("quiet", 0, 15, 0, 0.0, 4096, 0.0, 1, 0)]
    if groups is None:
        groups = [GroupRow("slow", "Stable", 3, 1, 1200, [
            {"topic": "busy", "partition": 0, "committed": 308_800, "end": 310_000, "lag": 1200}]),
            GroupRow("idle", "Empty", 1, 0, 5, [
                {"topic": "quiet", "partition": 0, "committed": 10, "end": 15, "lag": 5}])]
    return Snapshot("/tmp/d", 0.0, 1.0, "running", 192.0, processes, partitions, groups,
                    list(errors))


def screen(snap, state=None, trend=None, width=80, height=24) -> list[str]:
    lines = layout(snap, state or ViewState(), trend or LagTrend(), width, height)
    assert len(lines) <= height and all(len(line.text) <= width for line in lines)
    return [line.text for line in lines]


def test_the_overview_at_80x24_shows_totals_partitions_groups_and_processes():
    text = "\n".join(screen(snapshot()))
    assert "up 0:03:12" in text and "procs 4" in text and "12.4k rec/s" in text
    assert "lag 1.2k" in text
    for needle in ("busy/0", "quiet/0", "slow", "idle", "partition busy/0", "coordinator"):
        assert needle in text
    # The busiest partition first (records/s, descending by default).
    assert text.index("busy/0") < text.index("quiet/0")


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_and_size_fits_down_to_one_cell(view):
    """Never more lines or columns than the terminal has, at any size (curses raises for a
    write outside the window)."""
    snap = snapshot(errors=["groups: CoordinatorNotAvailableError: timed out"] * 3)
    for width in (1, 5, 19, 20, 33, 80, 200):
        for height in (0, 1, 3, 4, 7, 24, 60):
            screen(snap, ViewState(view=view), width=width, height=height)


def test_a_too_small_terminal_says_so():
    assert screen(snapshot(), width=19, height=24) == ["top: 19x24 is too small"[:19]]


def test_the_groups_view_shows_lag_per_partition_and_its_trend():
    trend = LagTrend()
    trend.add(snapshot(), 100.0)
    later = snapshot(groups=[GroupRow("slow", "Stable", 3, 1, 3200, [
        {"topic": "busy", "partition": 0, "committed": 308_800, "end": 312_000, "lag": 3200}])])
    trend.add(later, 102.0)
    lines = screen(later, ViewState(view="groups"), trend)
    [group] = [line for line in lines if line.startswith("slow")]
    assert "Stable" in group and "3.2k" in group and "^ +1.0k/s" in group
    [part] = [line for line in lines if "busy/0" in line]
    assert "committed 308.8k" in part and "3.2k" in part
    assert not any(line.startswith("idle") for line in lines)  # gone: no trend kept for it
    assert trend.per_s(("idle",)) is None


def test_trend_text():
    assert trend_text(None) == "-" and trend_text(0.2) == "= 0/s"
    assert trend_text(1500) == "^ +1.5k/s" and trend_text(-20) == "v -20/s"


def test_keys_switch_views_sort_reverse_pause_help_and_quit():
    state = ViewState()
    assert state.on_key("3") == "redraw" and state.view == "partitions"
    assert state.on_key("tab") == "redraw" and state.view == "groups"
    assert state.on_key("btab") == "redraw" and state.view == "partitions"
    state.on_key("s")  # records/s -> MB/s
    assert state.sort["partitions"] == (2, True)
    state.on_key("r")
    assert state.sort["partitions"] == (2, False)
    assert state.on_key(" ") is None and state.paused  # paused: nothing to redraw
    assert state.on_key(" ") == "sample" and not state.paused  # resumed: sample now
    state.on_key("h")
    assert state.help and state.on_key("x") == "redraw" and not state.help
    assert state.on_key("Z") is None
    assert state.on_key("q") == "quit"


def test_sort_by_name_ascending_puts_quiet_last():
    state = ViewState(view="partitions")
    state.sort["partitions"] = (0, False)
    lines = screen(snapshot(), state)
    assert lines.index(next(x for x in lines if x.startswith("busy/0"))) < \
        lines.index(next(x for x in lines if x.startswith("quiet/0")))
    assert "sort PARTITION ^" in lines[2]


def test_the_topic_filter_keeps_matching_partitions_groups_and_non_partition_processes():
    state = ViewState()
    for key in ("/", "Q", "u", "x", "backspace", "i", "enter"):  # typed "Qui": any case
        state.on_key(key)
    assert state.topic_filter == "Qui" and state.editing is None
    text = "\n".join(screen(snapshot(), state, height=40))
    assert "quiet/0" in text and "idle" in text and "coordinator" in text
    assert "busy/0" not in text and "slow" not in text
    assert "filter Qui" in text
    state.on_key("f")
    state.on_key("z")
    assert state.on_key("esc") == "redraw" and state.topic_filter == "Qui"  # Esc: unchanged
    for key in ("/", "backspace", "backspace", "backspace", "enter"):
        state.on_key(key)
    assert state.topic_filter == ""


def test_the_overview_cuts_a_long_list_and_counts_the_rest():
    many = [PartitionRow("t", i, i, 0, float(i), 0, 0.0, 1, 0) for i in range(100)]
    lines = screen(snapshot(partitions=many))
    [more] = [line for line in lines if line.startswith("... ")]
    assert "more" in more
    assert sum(line.startswith("t/") for line in lines) + int(more.split()[1]) == 100


def test_scrolling_is_clamped_to_the_last_page():
    many = [PartitionRow("t", i, i, 0, float(i), 0, 0.0, 1, 0) for i in range(100)]
    state = ViewState(view="partitions")
    state.sort["partitions"] = (0, False)
    state.on_key("end")
    lines = screen(snapshot(partitions=many), state)
    assert lines[-2].startswith("t/99") and state.scroll == 100 - (24 - 3 - 1 - 1)
    state.on_key("home")
    assert screen(snapshot(partitions=many), state)[4].startswith("t/0 ")


def test_extra_numeric_fields_of_a_newer_row_appear_as_columns():
    """The shared-memory counters (issue 6 §1) add fields to the rows; they are shown
    without this module knowing them, as far as the width allows."""
    # PartitionRow has ring_fill_percent now (shown as an extra column; its whole-table
    # ``counters`` dict is not shown); a newer row's dict of numbers is flattened.
    @dataclasses.dataclass
    class CountedRow(PartitionRow):
        newer: dict = dataclasses.field(default_factory=dict)

    rows = [CountedRow("busy", 0, 10, 0, 1.0, 100, 1.0, 1, 1, ring_fill_percent=42,
                       newer={"fsyncs": 3000}),
            CountedRow("quiet", 0, 10, 0, 0.0, 100, 0.0, 1, 1, newer={"fsyncs": 0})]
    lines = screen(snapshot(partitions=rows), ViewState(view="partitions"), width=120)
    assert "RING%" in lines[3] and "FSYNCS" in lines[3]
    [busy] = [line for line in lines if line.startswith("busy/0")]
    assert "42%" in busy and "3.0k" in busy
    narrow = screen(snapshot(partitions=rows), ViewState(view="partitions"), width=80)
    assert "RING%" not in narrow[3]  # no room at 80 columns: the known ones come first
