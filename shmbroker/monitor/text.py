"""A Snapshot as text that fits an 80-column terminal (`shmbroker top`, plain mode)."""
from __future__ import annotations

from .snapshot import Snapshot

#: Rows shown per section; the rest is summarised in one line (80x24 terminals).
ROWS_MAX = 40


def _num(value, unit: str = "") -> str:
    if value is None:
        return "-"
    value = float(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def _bytes(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    for scale, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}B"


def render(snap: Snapshot, rows_max: int = ROWS_MAX) -> str:
    uptime = "-" if snap.uptime_s is None else f"{int(snap.uptime_s) // 3600}:" \
        f"{int(snap.uptime_s) % 3600 // 60:02d}:{int(snap.uptime_s) % 60:02d}"
    in_rate = sum(p.records_per_s or 0 for p in snap.partitions)
    cpu = sum(p.cpu_percent or 0 for p in snap.processes)
    lines = [f"shmbroker {snap.data_dir}  state {snap.broker_state}  up {uptime}",
             f"{len(snap.processes)} processes  cpu {cpu:.0f}%  {len(snap.partitions)} partitions "
             f"{_num(in_rate)} rec/s in  {len(snap.groups)} groups"
             + ("" if snap.interval_s is not None else "  (rates: next refresh)"),
             "",
             f"{'PROCESS':<28}{'PID':>8} {'STATE':<10}{'CPU%':>6}{'RSS':>8}{'THR':>5}{'RST':>5}"]
    for p in snap.processes[:rows_max]:
        cpu_text = "-" if p.cpu_percent is None else f"{p.cpu_percent:.1f}"
        lines.append(f"{p.name[:27]:<28}{p.pid if p.pid is not None else '-':>8} "
                     f"{p.state[:9]:<10}{cpu_text:>6}{_bytes(p.rss_bytes):>8}"
                     f"{p.threads if p.threads is not None else '-':>5}{p.restarts:>5}")
    _more(lines, len(snap.processes), rows_max)
    # MB/S: record batch bytes appended per second (counters); RING%: the fullest ingress ring.
    lines += ["", f"{'PARTITION':<20}{'HW':>9}{'START':>9}{'REC/S':>8}{'MB/S':>8}{'RING%':>6}"
                  f"{'DISK':>8}{'SEGS':>5}{'PROD':>5}"]
    for p in sorted(snap.partitions, key=lambda r: -(r.records_per_s or 0))[:rows_max]:
        name = f"{p.topic}/{p.partition}"
        mb_s = "-" if p.bytes_in_per_s is None else f"{p.bytes_in_per_s / 1e6:.2f}"
        ring = "-" if p.ring_fill_percent is None else f"{p.ring_fill_percent}"
        lines.append(f"{name[:19]:<20}{_num(p.high_watermark):>9}{_num(p.log_start_offset):>9}"
                     f"{_num(p.records_per_s):>8}{mb_s:>8}{ring:>6}{_bytes(p.disk_bytes):>8}"
                     f"{p.segments:>5}{p.producers if p.producers is not None else '-':>5}")
    _more(lines, len(snap.partitions), rows_max)
    lines += ["", f"{'GROUP':<28}{'STATE':<20}{'GEN':>6}{'MEMBERS':>9}{'LAG':>10}"]
    for g in sorted(snap.groups, key=lambda r: -(r.lag or 0))[:rows_max]:
        lines.append(f"{g.group_id[:27]:<28}{g.state[:19]:<20}{g.generation_id:>6}{g.members:>9}"
                     f"{_num(g.lag):>10}")
    _more(lines, len(snap.groups), rows_max)
    for problem in snap.errors:
        lines.append(f"! {problem}")
    return "\n".join(lines) + "\n"


def _more(lines: list[str], count: int, rows_max: int) -> None:
    if count > rows_max:
        lines.append(f"... {count - rows_max} more")


#: The number formats, for the full-screen view (views.py): 1234567 -> '1.2M' (powers of
#: 1000), 1536 -> '1.5K' (powers of 1024), None -> '-'.
human_count = _num
human_bytes = _bytes
