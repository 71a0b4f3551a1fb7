"""The three services under one name, for callers written before each got its own module.

New code imports from :mod:`~rt_mindeye.runtime.scanner_service`, :mod:`~rt_mindeye.runtime.decoder_service`,
:mod:`~rt_mindeye.runtime.console_service` and :mod:`~rt_mindeye.runtime.events_planner`.
"""

from rt_mindeye.runtime.console_service import console_sources, run_console
from rt_mindeye.runtime.decoder_service import ResultsLog, run_decoder
from rt_mindeye.runtime.events_planner import EventsPlanner
from rt_mindeye.runtime.scanner_service import run_scanner
from rt_mindeye.runtime.service_support import STATE_SESSION_DONE, save_resolved_config, setup_logging

__all__ = ["EventsPlanner", "ResultsLog", "STATE_SESSION_DONE", "console_sources", "run_console", "run_decoder",
           "run_scanner", "save_resolved_config", "setup_logging"]
