"""rt_mindeye.console: the operator console (rich) and the session's HTML gallery.

State is an immutable snapshot folded from transport messages (state.py), views are pure builders (views.py), the
runner subscribes and repaints (runner.py), and gallery.py writes the browsable HTML. No torch here.
"""

from rt_mindeye.console.config import FIRMM_THRESHOLDS_MM, ConsoleConfig
from rt_mindeye.console.gallery import Gallery
from rt_mindeye.console.runner import Console, OperatorConsole, fold
from rt_mindeye.console.state import (
    LATENCY_STAGES, ConsoleState, PeerStatus, Retrieved, TrialRow, apply, apply_event, latency_summary, tick,
)
from rt_mindeye.console.views import fd_sparkline, make_layout, render, update_layout

__all__ = [
    "ConsoleConfig", "FIRMM_THRESHOLDS_MM", "ConsoleState", "TrialRow", "PeerStatus", "Retrieved", "apply",
    "apply_event", "tick", "latency_summary", "LATENCY_STAGES", "make_layout", "update_layout", "render",
    "fd_sparkline", "Gallery", "OperatorConsole", "Console", "fold",
]
