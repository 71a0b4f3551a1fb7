"""Pure view builders: a :class:`ConsoleState` in, rich renderables out (STYLE §6, rich ``examples/fullscreen.py``).

The layout is declared once by :func:`make_layout`; :func:`update_layout` fills its named regions from a snapshot and
:func:`render` does both (for tests and one-shot output). No builder reads anything but its arguments.
"""

from __future__ import annotations

import datetime as _dt
import math

from rich.console import Group
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rt_mindeye.console.state import LATENCY_STAGES, ConsoleState, latency_summary

__all__ = [
    "make_layout", "update_layout", "render", "fd_sparkline", "header_view", "motion_view", "latency_view",
    "trials_view", "peers_view", "policy_view", "fd_style",
]

_BARS = "▁▂▃▄▅▆▇█"
_FD_STYLES = ("green", "yellow", "dark_orange", "bold red")


def make_layout() -> Layout:
    """The screen's regions, declared once."""
    layout = Layout(name="root")
    layout.split(Layout(name="header", size=3), Layout(name="body", ratio=1), Layout(name="footer", size=9))
    layout["body"].split_row(Layout(name="left", ratio=2), Layout(name="trials", ratio=3))
    layout["left"].split(Layout(name="motion", size=9), Layout(name="latency", ratio=1))
    layout["footer"].split_row(Layout(name="peers", ratio=3), Layout(name="policy", ratio=2))
    return layout


def update_layout(layout: Layout, state: ConsoleState, *, now: float | None = None, trials_shown: int = 10) -> Layout:
    """Fill every region of ``layout`` from ``state`` (``now`` only for the clock and peer ages)."""
    now = state.updated_at if now is None else now
    layout["header"].update(header_view(state, now))
    layout["motion"].update(motion_view(state))
    layout["latency"].update(latency_view(state))
    layout["trials"].update(trials_view(state, trials_shown))
    layout["peers"].update(peers_view(state, now))
    layout["policy"].update(policy_view(state))
    return layout


def render(state: ConsoleState, *, now: float | None = None, trials_shown: int = 10) -> Layout:
    """A freshly built, filled layout for ``state``."""
    return update_layout(make_layout(), state, now=now, trials_shown=trials_shown)


# --- builders ------------------------------------------------------------------------------------------------------


def fd_style(fd: float, thresholds: tuple[float, ...]) -> str:
    """Colour of an FD value: green below the first FIRMM threshold, then yellow, orange, red."""
    level = sum(fd > t for t in thresholds)
    return _FD_STYLES[min(level, len(_FD_STYLES) - 1)]


def fd_sparkline(values: tuple[float, ...], thresholds: tuple[float, ...], width: int | None = None) -> Text:
    """One block character per volume, its height scaled to max(values, top threshold) and coloured by threshold."""
    if width is not None:
        values = values[-width:]
    text = Text()
    if not values:
        return text.append("(no FD yet)", style="dim")
    top = max(max(values), thresholds[-1] * 1.25 if thresholds else 0.5)
    for v in values:
        index = min(len(_BARS) - 1, max(0, int(round(v / top * (len(_BARS) - 1))))) if top > 0 else 0
        text.append(_BARS[index], style=fd_style(v, thresholds))
    return text


def header_view(state: ConsoleState, now: float) -> Panel:
    clock = _dt.datetime.fromtimestamp(now).strftime("%H:%M:%S") if now else "--:--:--"
    run = "-" if state.run is None else str(state.run)
    volume = "-" if state.last_volume is None else str(state.last_volume)
    gaps_in_run = sum(1 for r, _ in state.gaps if r == state.run)
    text = Text.assemble(("rt-mindeye  ", "bold"), ("session ", "dim"), (state.session or "-", "bold cyan"),
                         ("   run ", "dim"), (run, "bold"), ("   volume ", "dim"), (volume, "bold"),
                         (f" ({state.volumes_in_run} received, {state.volumes_total} in session)", "dim"),
                         ("   gaps ", "dim"), (str(gaps_in_run), "bold red" if gaps_in_run else "green"),
                         ("   ", ""), (clock, "dim"))
    return Panel(text)


def motion_view(state: ConsoleState) -> Panel:
    thresholds = state.fd_thresholds
    last = state.fd[-1] if state.fd else math.nan
    n = max(len(state.fd), 1)
    parts = [Text.assemble(("FD ", "bold"), (f"{last:.3f} mm" if math.isfinite(last) else "-", "bold"),
                           ("   FIRMM", "dim"))]
    for t, count in zip(thresholds, state.fd_over):
        parts[0].append(f"  >{t:g}: {count} ({100.0 * count / n:.0f}%)", style=fd_style(t + 1e-9, thresholds))
    parts.append(fd_sparkline(state.fd, thresholds, width=state.fd_window))
    parts.append(Text.assemble(("trials of the run over the motion gate: ", "dim"),
                               (str(state.gated_trials), "bold red" if state.gated_trials else "green")))
    if state.motion:
        tx, ty, tz, rx, ry, rz = state.motion
        parts.append(Text(f"trans mm {tx:+.2f} {ty:+.2f} {tz:+.2f}   rot deg {math.degrees(rx):+.2f} "
                          f"{math.degrees(ry):+.2f} {math.degrees(rz):+.2f}", style="dim"))
    return Panel(Group(*parts), title="motion (framewise displacement)", border_style="blue")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def latency_view(state: ConsoleState) -> Panel:
    table = Table(expand=True, box=None, pad_edge=False)
    table.add_column("since acquisition", style="bold")
    table.add_column("p50", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("n", justify="right", style="dim")
    for stage in LATENCY_STAGES:
        summary = latency_summary(state.latency(stage))
        if summary is None:
            continue
        p50, p99, count = summary
        table.add_row(stage, _seconds(p50), _seconds(p99), str(count))
    stages = Table(expand=True, box=None, pad_edge=False)
    stages.add_column("stage duration", style="bold")
    stages.add_column("p50", justify="right")
    stages.add_column("p99", justify="right")
    for name, samples in state.stage_ms:
        summary = latency_summary(samples)
        if summary is not None:
            stages.add_row(name, f"{summary[0]:.1f} ms", f"{summary[1]:.1f} ms")
    return Panel(Group(table, Text(""), stages), title="latency", border_style="magenta")


def trials_view(state: ConsoleState, shown: int = 10) -> Panel:
    rows = state.trials[-shown:][::-1]
    # The repeat-average and feedback columns appear once the session has any (they are options).
    with_averaged = any(row.averaged_topk for row in state.trials)
    with_feedback = any(row.feedback for row in state.trials)
    table = Table(expand=True, pad_edge=False)
    table.add_column("run/trial", no_wrap=True)
    table.add_column("type")
    table.add_column("estimate")
    table.add_column("top-5 retrieval (score)")
    if with_averaged:
        table.add_column("repeats averaged")
    table.add_column("recon")
    if with_feedback:
        table.add_column("feedback")
    table.add_column("latency", justify="right")
    table.add_column("flags")
    for row in rows:
        top = ", ".join(f"{r.label or r.id} ({r.score:.2f})" for r in row.topk[:5]) or "-"
        recon = (Text("✓ " + row.thumbnail_path.rsplit("/", 1)[-1], style="green") if row.thumbnail_path
                 else Text("✓", style="green") if row.reconstruction_path
                 else Text(row.policy_decision or "-", style="yellow" if row.policy_decision == "queued" else "dim"))
        latency = row.reconstruction_latency_s if row.reconstruction_latency_s is not None else row.retrieval_latency_s
        cells = [f"{row.run}/{row.trial}", row.trial_type or "-",
                 f"{row.estimate_kind} v{row.estimate_version}" if row.estimate_kind else "-", top]
        if with_averaged:
            cells.append(f"{row.averaged_topk[0].label or row.averaged_topk[0].id} ({row.averaged_topk[0].score:.2f}) "
                         f"x{row.n_repeats}" if row.averaged_topk else "-")
        cells.append(recon)
        if with_feedback:
            cells.append(Text(f"{row.feedback} {_seconds(row.feedback_latency_s)}",
                              style="green" if row.feedback == "on_time" else "bold yellow") if row.feedback
                         else Text("-", style="dim"))
        table.add_row(*cells, _seconds(latency), trial_flags(row))
    return Panel(table, title=f"trials ({len(state.trials)})", border_style="green")


def trial_flags(row) -> Text:
    """What a trial's row warns about: motion over the gate, the live events against the plan."""
    text = Text("")
    if row.motion_gated:
        text.append(f"FD {row.fd_max_mm:.2f} mm" if row.fd_max_mm is not None else "FD over gate", style="bold red")
    if row.design:
        text.append(("  " if text.plain else "") + row.design, style="bold red" if row.design == "not shown"
                    else "yellow")
    return text


def design_text(state: ConsoleState) -> Text:
    """The live events against the plan: the clock offset, the disagreements by kind, the latest one."""
    offset = "-" if state.clock_offset_s is None else f"{state.clock_offset_s * 1e3:+.0f} ms"
    text = Text.assemble(("\nclock offset ", "dim"), (offset, "bold"), ("   plan vs shown ", "dim"))
    if not state.design_counts:
        text.append("no disagreement", style="green")
    for kind, count in state.design_counts:
        text.append(f"{kind.replace('_', ' ')} {count}  ", style="bold yellow" if kind != "refit" else "dim")
    if state.design_notices:
        text.append("\n" + state.design_notices[-1], style="dim")
    return text


def peers_view(state: ConsoleState, now: float) -> Panel:
    table = Table.grid(padding=(0, 2))
    if not state.peers:
        table.add_row(Text("no service heard yet", style="dim"))
    for peer in state.peers:
        age = now - peer.last_seen if peer.last_seen else math.nan
        status = (Text("ALIVE", style="bold green") if peer.alive else Text("stopped", style="bold") if peer.stopped
                  else Text("DEAD", style="bold white on red"))
        table.add_row(Text(peer.name, style="bold"), status, Text(peer.state or "-"),
                      Text(f"seen {age:.1f} s ago" if math.isfinite(age) else "never", style="dim"),
                      Text(peer.detail, style="dim"))
    gaps = [f"{r}:{v}" for r, v in state.gaps[-12:]]
    footer = Text("missing volumes: " + (", ".join(gaps) if gaps else "none"),
                  style="red" if gaps else "dim")
    return Panel(Group(table, footer), title="services", border_style="cyan")


def policy_view(state: ConsoleState) -> Panel:
    text = Text.assemble(("reconstruction policy ", "dim"), (state.recon_policy or "-", "bold"),
                         ("\nbacklog ", "dim"), (str(state.recon_backlog), "bold yellow" if state.recon_backlog else
                                                 "bold"),
                         ("   skipped ", "dim"), (str(state.recon_skipped), "bold"),
                         ("\nstimulus events ", "dim"), (str(state.stimulus_events), "bold"),
                         ("  ", ""), (state.last_stimulus, "dim"),
                         ("\nfeedback sent ", "dim"), (str(state.feedback_sent), "bold"),
                         ("   late ", "dim"), (str(state.feedback_late),
                                              "bold yellow" if state.feedback_late else "bold"))
    text.append(design_text(state))
    return Panel(text, title="decoder and stimulus", border_style="yellow")
