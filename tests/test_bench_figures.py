"""How the fleet benchmark turns rounds and readings into figures: a mesh that falls behind
is reported as such, memory that levels off is not called a leak, and a tracemalloc diff
names the line that allocated. No mesh runs here; `test_bench.py` runs the real one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench import fleetreport, memory, svgplot
from bench.fleetload import NOT_STARTED, Round
from bench.fleetreport import Window
from services.mesh import memtrace

WINDOW = Window(start=10.0, duration=20.0)


def _steady(nodes: int, interval: float, latency: float) -> list[Round]:
    """Every node due once an interval from 0 to 30 s, each round ``latency`` long."""
    rounds = []
    for i in range(nodes):
        due = i * interval / nodes
        while due < WINDOW.end:
            rounds.append(Round(due, due, due + latency, True, ""))
            due += interval
    return rounds


def test_a_mesh_that_keeps_up_achieves_what_was_offered() -> None:
    figures = fleetreport.throughput(_steady(100, 10.0, 0.05), WINDOW, 10.0)
    assert figures["offered"] == {"rounds": 200, "per_s": 10.0}
    assert figures["achieved"]["rounds"] == 200
    assert figures["achieved"]["per_s"] <= figures["offered"]["per_s"]
    assert figures["kept_up"] is True
    assert figures["latency_ms"]["p50"] == figures["latency_ms"]["p99"] == 50.0
    assert figures["backlog"]["late_rounds"] == figures["backlog"]["not_started"] == 0


def test_a_mesh_that_falls_behind_is_reported_with_its_backlog() -> None:
    rounds = [r for r in _steady(100, 10.0, 0.05) if r.due < WINDOW.start]
    in_window = [r for r in _steady(100, 10.0, 0.05) if r.due >= WINDOW.start]
    for k, r in enumerate(in_window):
        if k % 4 == 0:  # a quarter never started before the load gave up
            rounds.append(Round(r.due, -1.0, -1.0, False, NOT_STARTED))
        else:  # the rest started ever later, up to 15 s behind, and finished late
            lag = 15.0 * (r.due - WINDOW.start) / WINDOW.duration
            rounds.append(Round(r.due, r.due + lag, r.due + lag + 0.05, True, ""))
    figures = fleetreport.throughput(rounds, WINDOW, 10.0)
    assert figures["kept_up"] is False
    assert figures["backlog"]["not_started"] == 50
    assert figures["backlog"]["late_rounds"] > 0
    assert figures["failed"] == {NOT_STARTED: 50}
    assert figures["achieved"]["seconds"] > WINDOW.duration  # late finishes stretch the time
    assert figures["achieved"]["per_s"] < 0.75 * figures["offered"]["per_s"]
    assert figures["latency_ms"]["p99"] > 10_000


def test_the_timeline_shows_each_bins_rates() -> None:
    rows = fleetreport.timeline(_steady(100, 10.0, 0.05), WINDOW, [], 5.0)
    assert [row["t_s"] for row in rows] == [5.0, 10.0, 15.0, 20.0]
    assert all(row["offered_per_s"] == 10.0 for row in rows)
    assert all(9.0 <= row["achieved_per_s"] <= 11.0 for row in rows)


def test_plot_axes_cover_the_data_with_round_ticks() -> None:
    assert svgplot.nice_ticks(97.7) == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
    assert svgplot.log_ticks(26.5, 3713.0) == [20, 50, 100, 200, 500, 1000, 2000, 5000]
    assert svgplot.log_ticks(10.0, 10.0) == [10, 20]


def _series(values: list[int]) -> memory.Series:
    series = memory.Series()
    for t, kb in enumerate(values):
        series.add(float(t * 10), memory.Reading(kb, max(values)))
    return series


def test_steady_growth_is_flagged_and_a_plateau_is_not() -> None:
    leak = _series([100_000 + 500 * k for k in range(19)])
    summary = leak.summary(180.0)
    assert summary is not None and summary["growing"] is True
    assert summary["growth_kb"] == 9000 and summary["slope_kb_per_min"] == 3000.0

    filled = _series([100_000 + min(k, 6) * 1500 for k in range(19)])  # a cache filling up
    summary = filled.summary(180.0)
    assert summary is not None and summary["growth_kb"] == 9000
    assert summary["growing"] is False

    flat = _series([100_000] * 19)
    summary = flat.summary(180.0)
    assert summary is not None and summary["growing"] is False and summary["growth_kb"] == 0


def test_memory_is_read_from_the_kernel() -> None:
    reading = memory.read(os.getpid())
    assert reading is not None and 0 < reading.rss_kb <= reading.hwm_kb
    assert memory.read(2**22 + 1) is None  # above the kernel's pid limit: no such process


LEAKY = """
    import os, signal, sys
    from services.mesh import memtrace
    memtrace.install_from_env("leaky")
    os.kill(os.getpid(), signal.SIGUSR2)
    kept = []
    for _ in range(4000):
        kept.append(bytearray(1000))  # LEAK
    os.kill(os.getpid(), signal.SIGUSR2)
"""


def test_a_snapshot_diff_names_the_line_that_kept_allocating(tmp_path: Path) -> None:
    script = tmp_path / "leaky.py"
    script.write_text(textwrap.dedent(LEAKY))
    line = next(i for i, text in enumerate(script.read_text().splitlines(), 1) if "LEAK" in text)
    env = {**os.environ, memtrace.ENV_DIR: str(tmp_path / "snaps")}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=60)
    first, second = sorted((tmp_path / "snaps").glob("leaky-*.snap"))
    rows = memtrace.growth(first, second)
    assert rows[0]["where"][0] == f"{tmp_path.name}/leaky.py:{line}"
    assert rows[0]["size_diff_kb"] >= 3900
    assert rows[0]["count_diff"] >= 4000


def test_tracing_is_off_unless_asked() -> None:
    env = {k: v for k, v in os.environ.items() if k != memtrace.ENV_DIR}
    code = "from services.mesh import memtrace; import tracemalloc; "
    code += "print(memtrace.install_from_env('x'), tracemalloc.is_tracing())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    assert out.stdout.split() == ["None", "False"]
