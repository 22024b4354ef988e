"""What the full-screen `shmbroker top` shows: its views, their columns, the sort orders, the
topic filter, and the key bindings, laid out as lines of text for a terminal of a given size.

Pure: no curses, no clock, no broker. ``screen.py`` feeds it snapshots and key names and draws
the lines it returns, so every decision about what appears where is testable without a
terminal (tests/unit/monitor/test_views.py).

A worked example, 80x24, view 3 (partitions) sorted by records/s, filtered to topics with
"busy" in their name::

    shmbroker /tmp/d  running  up 0:03:12  5 procs  cpu 97%  rss 212M
    3 partitions  12.4k rec/s  1.3 MB/s  disk 40.2M  1 group  lag 1.2k
     1 Overview  [3 Partitions]  ...              sort REC/S v  filter busy
    PARTITION              REC/S   MB/S        HW  ...
    busy/0                 12.4k    1.3    310.0k  ...
    ...
    q quit  1-4 Tab view  s sort  r reverse  / filter  space pause  h help

Extra numeric fields that a newer :class:`~shmbroker.monitor.snapshot.PartitionRow` or
``ProcessRow`` carries (the shared-memory counters of issue 6 §1, e.g. ring fill) appear as
extra columns, after the known ones, as far as the width allows; nothing here has to change
when they are added (:func:`extra_columns`).

Owned by the thread that draws; not thread-safe.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from .snapshot import GroupRow, PartitionRow, ProcessRow, Snapshot
from .text import human_bytes, human_count

VIEWS = ("overview", "processes", "partitions", "groups")
VIEW_TITLES = {"overview": "Overview", "processes": "Processes", "partitions": "Partitions",
               "groups": "Groups"}
#: Below this the screen says only that it is too small (nothing useful fits).
WIDTH_MIN, HEIGHT_MIN = 20, 4
#: Lag samples kept per group (and group partition) for the trend; one per refresh.
TREND_SAMPLES_MAX = 30
#: The trend is the lag's change per second over at most this long.
TREND_WINDOW_S = 10.0
FILTER_CHARS_MAX = 64
#: Extra (counter) columns shown at most, beyond the known ones.
EXTRA_COLUMNS_MAX = 6

HELP = """\
Keys
  1 2 3 4      overview, processes, partitions, groups
  Tab, S-Tab   next, previous view
  s            sort by the next column of this view (the sorted column is marked)
  r            reverse the sort order
  / or f       filter by topic (substring, any case); Enter applies, Esc cancels,
               an empty filter shows everything
  space or p   pause (no sampling, the screen stays as it is); again to resume
  Up Down PgUp PgDn Home End (or j k)  scroll the view
  h or ?       this help; any key closes it
  q            quit (Ctrl-C too)

What is shown
  Processes   CPU% since the last refresh, RSS, threads, restarts (psutil)
  Partitions  records/s and MB/s appended (high watermark and disk growth between
              refreshes), high watermark, log start, disk, segments, producers
  Groups      state, generation, members, lag (end - committed) in total and per
              partition, and its trend: the lag's change per second (^ rising, v falling)"""


@dataclass(frozen=True)
class Line:
    text: str
    style: str = "normal"  # normal | title | tabs | header | dim | warn | footer
    mark: tuple[int, int] | None = None  # [start, end) drawn highlighted: the sorted column


@dataclass(frozen=True)
class Column:
    header: str
    width: int
    cell: Callable[[Any], str]
    sort_key: Callable[[Any], Any] | None  # None: the view cannot be sorted by it
    left: bool = False  # text columns are left-aligned, numbers right-aligned

    def format(self, text: str) -> str:
        text = text[:self.width]
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"


def _opt(value, fmt: Callable[[Any], str] = str) -> str:
    return "-" if value is None else fmt(value)


def _lowest(value):
    """A sort key that puts None below every number."""
    return (value is not None, value if value is not None else 0)


# --- the known columns of each view ------------------------------------------------------------

PROCESS_COLUMNS = (
    Column("NAME", 27, lambda p: p.name, lambda p: p.name, left=True),
    Column("PID", 8, lambda p: _opt(p.pid), lambda p: _lowest(p.pid)),
    Column(" STATE", 11, lambda p: " " + p.state, lambda p: p.state, left=True),
    Column("CPU%", 6, lambda p: _opt(p.cpu_percent, lambda v: f"{v:.1f}"),
           lambda p: _lowest(p.cpu_percent)),
    Column("RSS", 8, lambda p: human_bytes(p.rss_bytes), lambda p: _lowest(p.rss_bytes)),
    Column("THR", 5, lambda p: _opt(p.threads), lambda p: _lowest(p.threads)),
    Column("RST", 5, lambda p: str(p.restarts), lambda p: p.restarts),
)
PARTITION_COLUMNS = (
    Column("PARTITION", 22, lambda p: f"{p.topic}/{p.partition}",
           lambda p: (p.topic, p.partition), left=True),
    Column("REC/S", 8, lambda p: human_count(p.records_per_s),
           lambda p: _lowest(p.records_per_s)),
    Column("MB/S", 7, lambda p: _opt(p.disk_bytes_per_s, lambda v: f"{v / 1e6:.2f}"),
           lambda p: _lowest(p.disk_bytes_per_s)),
    Column("HW", 9, lambda p: human_count(p.high_watermark), lambda p: _lowest(p.high_watermark)),
    Column("START", 8, lambda p: human_count(p.log_start_offset),
           lambda p: _lowest(p.log_start_offset)),
    Column("DISK", 8, lambda p: human_bytes(p.disk_bytes), lambda p: p.disk_bytes),
    Column("SEGS", 5, lambda p: str(p.segments), lambda p: p.segments),
    Column("PROD", 5, lambda p: _opt(p.producers), lambda p: _lowest(p.producers)),
)
# The group columns read a GroupView (a group row with its trend), see group_views().
GROUP_COLUMNS = (
    Column("GROUP", 22, lambda g: g.name, lambda g: g.name, left=True),
    Column(" STATE", 19, lambda g: " " + g.state, lambda g: g.state, left=True),
    Column("GEN", 5, lambda g: g.generation, lambda g: g.sort_generation),
    Column("MEMB", 5, lambda g: g.members, lambda g: g.sort_members),
    Column("LAG", 9, lambda g: human_count(g.lag), lambda g: _lowest(g.lag)),
    Column("TREND", 11, lambda g: g.trend_text, lambda g: _lowest(g.trend_per_s)),
)

#: Fields from the counters regions are shown as extra columns (RING%, IN/S), so they are
#: not "known"; the whole-table ``counters`` dicts stay out of the view (JSON has them).
_COUNTER_COLUMNS = {"bytes_in_per_s", "ring_fill_percent", "records_out_per_s",
                    "bytes_out_per_s"}
_KNOWN_FIELDS = {
    ProcessRow: {f.name for f in dataclasses.fields(ProcessRow)},
    PartitionRow: {f.name for f in dataclasses.fields(PartitionRow)} - _COUNTER_COLUMNS,
}
#: Short headers for counters we expect (issue 6 §1); any other numeric field gets its name.
_EXTRA_HEADERS = {"ring_fill_percent": "RING%", "ring_fill_pct": "RING%", "ring_fill": "RING%",
                  "bytes_in_per_s": "IN/S", "bytes_out_per_s": "OUT/S",
                  "records_out_per_s": "OUT R/S", "batches_per_s": "BATCH/S",
                  "clients": "CLIENTS", "errors": "ERRORS", "fsync_age_s": "FSYNC"}


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _field_values(row: Any, known: set[str]) -> dict[str, Any]:
    """A row's numeric fields beyond ``known``; a dict field is flattened one level."""
    out: dict[str, Any] = {}
    for name, value in vars(row).items():  # bounded by the row's fields
        if name in known:
            continue
        if isinstance(value, dict):
            for key, inner in value.items():
                if _is_number(inner):
                    out[f"{name}.{key}"] = inner
        elif _is_number(value):
            out[name] = value
    return out


def _extra_header(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _EXTRA_HEADERS:
        return _EXTRA_HEADERS[leaf]
    return (leaf.replace("_per_s", "/s").replace("_percent", "%").replace("_bytes", "")
            .replace("_", " ").upper())[:9]


def _extra_cell(name: str, value) -> str:
    if value is None:
        return "-"
    if "percent" in name or "fill" in name or name.endswith("pct"):
        return f"{value:.0f}%"
    if "bytes" in name:
        return human_bytes(value)
    return human_count(value)


def extra_columns(rows: list, row_type: type) -> tuple[Column, ...]:
    """Columns for the numeric fields that ``rows`` carry beyond the ones this module knows
    (at most EXTRA_COLUMNS_MAX; a field shown only when some row has a value for it)."""
    known = _KNOWN_FIELDS.get(row_type, set())
    names: dict[str, None] = {}
    for row in rows:
        for name, value in _field_values(row, known).items():
            if value is not None:
                names.setdefault(name)
    columns = []
    for name in list(names)[:EXTRA_COLUMNS_MAX]:
        header = _extra_header(name)
        columns.append(Column(header, max(len(header), 7),
                              lambda r, n=name: _extra_cell(n, _field_values(r, known).get(n)),
                              lambda r, n=name: _lowest(_field_values(r, known).get(n))))
    return tuple(columns)


# --- lag trend ---------------------------------------------------------------------------------

class LagTrend:
    """The recent lag of each group (and each of its partitions), one sample per refresh, and
    its change per second over the last TREND_WINDOW_S."""

    def __init__(self) -> None:
        self._history: dict[tuple, collections.deque] = {}

    def add(self, snap: Snapshot, at_s: float) -> None:
        seen = set()
        for g in snap.groups:
            for key, lag in [((g.group_id,), g.lag)] + [
                    ((g.group_id, r["topic"], r["partition"]), r.get("lag"))
                    for r in g.partitions]:
                seen.add(key)
                if lag is not None:
                    self._history.setdefault(
                        key, collections.deque(maxlen=TREND_SAMPLES_MAX)).append((at_s, lag))
        for key in [k for k in self._history if k not in seen]:  # groups that are gone
            del self._history[key]

    def per_s(self, key: tuple) -> float | None:
        samples = self._history.get(key)
        if not samples or len(samples) < 2:
            return None
        last_at, last = samples[-1]
        first_at, first = next(((t, v) for t, v in samples if last_at - t <= TREND_WINDOW_S),
                               samples[-1])
        if last_at - first_at <= 0:
            first_at, first = samples[-2]
        return (last - first) / (last_at - first_at) if last_at > first_at else None


def trend_text(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    if abs(per_s) < 0.5:
        return "= 0/s"
    arrow = "^" if per_s > 0 else "v"
    return f"{arrow} {'+' if per_s > 0 else '-'}{human_count(abs(per_s))}/s"


@dataclass(frozen=True)
class GroupView:
    """One line of the groups view: a group, or (indented) one of its partitions."""
    name: str
    state: str
    generation: str
    members: str
    lag: int | None
    trend_per_s: float | None
    sort_generation: int = 0
    sort_members: int = 0
    partitions: tuple = ()  # GroupViews of the group's partitions (a group line only)

    @property
    def trend_text(self) -> str:
        return trend_text(self.trend_per_s)


def group_views(groups: list[GroupRow], trend: LagTrend, topic_filter: str) -> list[GroupView]:
    out = []
    for g in groups:
        parts = [r for r in g.partitions if topic_matches(str(r["topic"]), topic_filter)]
        if topic_filter and not parts:
            continue
        lags = [r["lag"] for r in parts if r.get("lag") is not None]
        lag = g.lag if not topic_filter else (sum(lags) if lags else None)
        children = tuple(GroupView(
            f" - {r['topic']}/{r['partition']}", f" committed {human_count(r['committed'])}"
            if r.get("committed", -1) >= 0 else " committed -", "", "", r.get("lag"),
            trend.per_s((g.group_id, r["topic"], r["partition"])))
            for r in parts)
        out.append(GroupView(g.group_id, g.state, str(g.generation_id), str(g.members), lag,
                             trend.per_s((g.group_id,)), g.generation_id, g.members, children))
    return out


# --- filter and state --------------------------------------------------------------------------

def topic_matches(topic: str, topic_filter: str) -> bool:
    return not topic_filter or topic_filter.lower() in topic.lower()


def process_topic(p: ProcessRow) -> str | None:
    """The topic a partition process serves ('partition orders/3' -> 'orders'); None for the
    other roles, which serve every topic and so pass any filter."""
    if p.role != "partition":
        return None
    return p.name.removeprefix("partition ").rpartition("/")[0] or None


@dataclass
class ViewState:
    """What the operator chose: view, sort per view, topic filter, pause, scroll, help."""
    view: str = "overview"
    # Per view: (index into its columns, descending). Defaults: the busiest first.
    sort: dict[str, tuple[int, bool]] = field(default_factory=lambda: {
        "processes": (3, True), "partitions": (1, True), "groups": (4, True)})
    topic_filter: str = ""
    editing: str | None = None  # the filter being typed; None when not typing
    paused: bool = False
    help: bool = False
    scroll: int = 0

    def on_key(self, key: str) -> str | None:
        """Apply one key (a character, or a name: up, down, pgup, pgdn, home, end, enter,
        esc, backspace, tab, btab, resize). Returns 'quit', 'sample' (resume: sample now),
        'redraw', or None (nothing changed)."""
        if self.editing is not None:
            return self._on_filter_key(key)
        if self.help:
            self.help = False
            return "redraw"
        if key == "q":
            return "quit"
        if key in ("1", "2", "3", "4"):
            self._switch(VIEWS[int(key) - 1])
        elif key in ("tab", "btab"):
            step = 1 if key == "tab" else -1
            self._switch(VIEWS[(VIEWS.index(self.view) + step) % len(VIEWS)])
        elif key == "s":
            self._next_sort()
        elif key == "r":
            view = self._sort_view()
            index, descending = self.sort[view]
            self.sort[view] = (index, not descending)
        elif key in ("/", "f"):
            self.editing = self.topic_filter
        elif key in (" ", "p"):
            self.paused = not self.paused
            return None if self.paused else "sample"
        elif key in ("h", "?"):
            self.help = True
        elif key in ("down", "j", "up", "k", "pgdn", "pgup", "home", "end"):
            self._scroll(key)
        elif key != "resize":
            return None
        return "redraw"

    def _on_filter_key(self, key: str) -> str:
        assert self.editing is not None
        if key == "enter":
            self.topic_filter, self.editing, self.scroll = self.editing.strip(), None, 0
        elif key == "esc":
            self.editing = None
        elif key == "backspace":
            self.editing = self.editing[:-1]
        elif len(key) == 1 and key.isprintable() and len(self.editing) < FILTER_CHARS_MAX:
            self.editing += key
        return "redraw"

    def _switch(self, view: str) -> None:
        self.view, self.scroll = view, 0

    def _sort_view(self) -> str:
        return "partitions" if self.view == "overview" else self.view  # overview: partitions

    def _next_sort(self) -> None:
        view = self._sort_view()
        columns = {"processes": PROCESS_COLUMNS, "partitions": PARTITION_COLUMNS,
                   "groups": GROUP_COLUMNS}[view]
        index, descending = self.sort[view]
        index = (index + 1) % len(columns)
        self.sort[view] = (index, descending)

    def _scroll(self, key: str) -> None:
        step = {"down": 1, "j": 1, "up": -1, "k": -1, "pgdn": 10, "pgup": -10}.get(key)
        if key == "home":
            self.scroll = 0
        elif key == "end":
            self.scroll = 1 << 30  # clamped by layout() to the last page
        else:
            assert step is not None
            self.scroll = max(0, self.scroll + step)


# --- layout ------------------------------------------------------------------------------------

#: Lines of snapshot errors shown at most (the rest are counted).
ERROR_LINES_MAX = 2


def layout(snap: Snapshot | None, state: ViewState, trend: LagTrend, width: int, height: int,
           message: str = "") -> list[Line]:
    """The whole screen: at most ``height`` lines of at most ``width`` characters. Clamps
    ``state.scroll`` to the view's last page."""
    if width < WIDTH_MIN or height < HEIGHT_MIN:
        return [Line(f"top: {width}x{height} is too small"[:width])][:max(height, 0)]
    top = _header(snap, state, width)
    footer = _footer(state, message)
    body_h = height - len(top) - 1
    if state.help:
        body = [Line(text) for text in HELP.splitlines()][:body_h]
    elif snap is None:
        body = [Line("waiting for the first sample...")]
    else:
        problems = [Line(f"! {p}", "warn") for p in snap.errors[:ERROR_LINES_MAX]]
        if len(snap.errors) > ERROR_LINES_MAX:
            problems[-1] = Line(f"! {snap.errors[ERROR_LINES_MAX - 1]} "
                                f"(+{len(snap.errors) - ERROR_LINES_MAX} more)", "warn")
        problems = problems[:max(0, body_h - 2)]
        body = _body(snap, state, trend, width, body_h - len(problems)) + problems
    lines = top + body[:body_h] + [Line("", "normal")] * (body_h - len(body[:body_h])) + [footer]
    return [dataclasses.replace(line, text=line.text[:width]) for line in lines[:height]]


def _header(snap: Snapshot | None, state: ViewState, width: int) -> list[Line]:
    tabs = "  ".join(f"[{i + 1} {VIEW_TITLES[v]}]" if v == state.view
                     else f"{i + 1} {VIEW_TITLES[v]}" for i, v in enumerate(VIEWS))
    view = state._sort_view()
    columns = _columns(view, snap)
    index, descending = state.sort[view]
    status = f"sort {columns[min(index, len(columns) - 1)].header.strip()} " \
        f"{'v' if descending else '^'}"
    if state.topic_filter:  # before the sort: cut last on a narrow terminal
        status = f"filter {state.topic_filter}  {status}"
    tab_line = Line(f"{tabs}  {status}", "tabs")
    if snap is None:
        return [Line("shmbroker", "title"), Line(""), tab_line]
    up = snap.uptime_s
    uptime = "-" if up is None else \
        f"{int(up) // 3600}:{int(up) % 3600 // 60:02d}:{int(up) % 60:02d}"
    cpu = sum(p.cpu_percent or 0 for p in snap.processes)
    rss = sum(p.rss_bytes or 0 for p in snap.processes)
    rate = sum(p.records_per_s or 0 for p in snap.partitions)
    mb_s = sum(p.disk_bytes_per_s or 0 for p in snap.partitions) / 1e6
    disk = sum(p.disk_bytes for p in snap.partitions)
    lags = [g.lag for g in snap.groups if g.lag is not None]
    first = (f"shmbroker {snap.data_dir}  {snap.broker_state}  up {uptime}  "
             f"procs {len(snap.processes)}  cpu {cpu:.0f}%  rss {human_bytes(rss)}")
    second = (f"partitions {len(snap.partitions)}  {human_count(rate)} rec/s  {mb_s:.2f} MB/s  "
              f"disk {human_bytes(disk)}  groups {len(snap.groups)}  "
              f"lag {human_count(sum(lags)) if lags else '-'}"
              + ("" if snap.interval_s is not None else "  (rates: next refresh)"))
    return [Line(first, "title"), Line(second), tab_line]


def _footer(state: ViewState, message: str) -> Line:
    if state.editing is not None:
        return Line(f"filter topic: {state.editing}_   (Enter apply, Esc cancel, empty: all)",
                    "footer")
    if message:
        return Line(message, "warn")
    hints = "q quit  1-4 Tab view  s sort  r reverse  / filter  space pause  h help"
    return Line(("PAUSED (space resumes)  " if state.paused else "") + hints, "footer")


def _columns(view: str, snap: Snapshot | None) -> tuple[Column, ...]:
    if view == "processes":
        return PROCESS_COLUMNS + extra_columns(snap.processes if snap else [], ProcessRow)
    if view == "partitions":
        return PARTITION_COLUMNS + extra_columns(snap.partitions if snap else [], PartitionRow)
    return GROUP_COLUMNS


def _rows(view: str, snap: Snapshot, state: ViewState, trend: LagTrend) -> list:
    """The view's rows, filtered and sorted (groups: each followed by its partitions)."""
    columns = _columns(view, snap)
    index, descending = state.sort[view]
    key = columns[min(index, len(columns) - 1)].sort_key
    assert key is not None
    if view == "processes":
        rows = [p for p in snap.processes
                if process_topic(p) is None or topic_matches(process_topic(p), state.topic_filter)]
    elif view == "partitions":
        rows = [p for p in snap.partitions if topic_matches(p.topic, state.topic_filter)]
    else:
        rows = group_views(snap.groups, trend, state.topic_filter)
    # Ties keep the snapshot's order (by name), so equal rows do not jump between refreshes.
    return sorted(rows, key=key, reverse=descending)


def _table(columns: tuple[Column, ...], rows: list, width: int, sort_index: int,
           descending: bool) -> tuple[Line, list[Line]]:
    shown, used = [], 0
    for column in columns:  # as many columns as fit the width
        if shown and used + 1 + column.width > width:
            break
        shown.append(column)
        used += column.width + (1 if len(shown) > 1 else 0)
    sorted_column = columns[min(sort_index, len(columns) - 1)]
    header = " ".join(c.format(c.header) for c in shown)
    mark = None
    if sorted_column in shown:
        start = sum(c.width + 1 for c in shown[:shown.index(sorted_column)])
        mark = (start, start + sorted_column.width)
    return Line(header, "header", mark), [Line(" ".join(c.format(c.cell(r)) for c in shown))
                                    for r in rows]


def _view_lines(view: str, snap: Snapshot, state: ViewState, trend: LagTrend, width: int,
                children: bool) -> tuple[Line, list[Line]]:
    columns = _columns(view, snap)
    rows = _rows(view, snap, state, trend)
    if view == "groups" and children:
        rows = [line for g in rows for line in (g, *sorted(
            g.partitions, key=lambda c: (_lowest(c.lag), c.name), reverse=True))]
    index, descending = state.sort[view]
    return _table(columns, rows, width, index, descending)


def _body(snap: Snapshot, state: ViewState, trend: LagTrend, width: int, body_h: int
          ) -> list[Line]:
    if body_h <= 0:
        return []
    if state.view != "overview":
        header, rows = _view_lines(state.view, snap, state, trend, width, children=True)
        page = max(1, body_h - 1)
        state.scroll = max(0, min(state.scroll, len(rows) - page))
        if not rows:
            rows = [Line("(nothing matches the filter)" if state.topic_filter else "(none)",
                         "dim")]
        return [header] + rows[state.scroll:state.scroll + page]
    return _overview(snap, state, trend, width, body_h)


def _overview(snap: Snapshot, state: ViewState, trend: LagTrend, width: int, body_h: int
              ) -> list[Line]:
    """The three views stacked, each cut to its share of the height ('... N more' at its end)."""
    sections = [_view_lines(v, snap, state, trend, width, children=False)
                for v in ("partitions", "groups", "processes")]
    wanted = [1 + max(1, len(rows)) for _, rows in sections]
    room = body_h - (len(sections) - 1)  # a blank line between sections
    given = [0] * len(sections)
    for _ in range(max(0, room)):  # bounded: one line handed out per turn
        open_ = [i for i in range(len(sections)) if given[i] < wanted[i]]
        if not open_:
            break
        given[min(open_, key=lambda i: given[i])] += 1
    out: list[Line] = []
    for (header, rows), lines in zip(sections, given):
        if lines <= 0:
            continue
        if out:
            out.append(Line(""))
        out.append(header)
        rows = rows or [Line("(nothing matches the filter)" if state.topic_filter
                             else "(none)", "dim")]
        if len(rows) > lines - 1:
            keep = max(0, lines - 2)
            rows = rows[:keep] + [Line(f"... {len(rows) - keep} more (keys 2-4: one view)",
                                       "dim")]
        out.extend(rows[:max(0, lines - 1)])
    return out
