"""Example: report stimuli from a PsychoPy experiment to the rt-mindeye scanner host.

Copy ``rt_mindeye/transport/stimulus_client.py`` next to this script on the stimulus computer (it needs only pyzmq,
which ships with PsychoPy's standalone installer; otherwise ``pip install pyzmq``). The scanner host listens on
port 5560 (``transport.port_stimulus``); beyond loopback it needs CURVE keys, passed as ``curve=(client .key_secret,
server .key)``.

Timing: onsets are seconds after the scanner trigger on PsychoPy's clock, taken from ``win.flip()`` (the moment the
stimulus actually appeared). The scanner host anchors time 0 of the run at the acquisition time of the run's first
volume, so the events land on the scanner's acquisition clock.

Run without PsychoPy (``python docs/examples/psychopy_stimulus.py --dry-run``) to send a few events with a simulated
clock, e.g. against ``rt-mindeye`` services on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:  # the stand-alone copy next to the script
    from stimulus_client import StimulusClient
except ImportError:  # inside the rt-mindeye repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from rt_mindeye.transport.stimulus_client import StimulusClient

SCANNER = "tcp://127.0.0.1:5560"
TRIGGER_KEY = "5"          # most scanners send the trigger as a "5" key press
STIM_DURATION_S = 3.0
ISI_S = 1.0
IMAGES = ["shared0001.png", "shared0002.png", "shared0003.png"]


def run_psychopy(endpoint: str, session: str, run: int) -> None:
    from psychopy import core, event, visual  # noqa: PLC0415 - only on the stimulus computer

    win = visual.Window(fullscr=True, color="grey", units="height")
    # win.flip() returns its time on core.getTime's clock, so the client uses that clock too.
    client = StimulusClient(endpoint, session=session, run=run, clock=core.getTime)
    fixation = visual.TextStim(win, "+", height=0.05)
    fixation.draw()
    win.flip()
    event.waitKeys(keyList=[TRIGGER_KEY])            # the scanner's first trigger pulse
    trigger_time = client.trigger()                  # time 0 of the run on this clock
    for trial, image in enumerate(IMAGES, start=1):
        stim = visual.ImageStim(win, image, size=(0.8, 0.8))
        stim.draw()
        shown_at = win.flip()                        # returns when the image is on screen
        client.event(trial=trial, onset=shown_at - trigger_time, duration=STIM_DURATION_S,
                     trial_type="image", stim_file=image)
        core.wait(STIM_DURATION_S)
        fixation.draw()
        win.flip()
        core.wait(ISI_S)
    client.close(timeout_s=2.0)                     # waits (bounded) for the scanner host's acknowledgements
    win.close()


def run_dry(endpoint: str, session: str, run: int) -> None:
    client = StimulusClient(endpoint, session=session, run=run)
    client.trigger()
    for trial, image in enumerate(IMAGES, start=1):
        client.event(trial=trial, duration=STIM_DURATION_S, trial_type="image", stim_file=image)  # onset = now
        time.sleep(0.2)
    acknowledged = client.close(timeout_s=2.0)
    print(f"sent {len(IMAGES)} events to {endpoint}; all acknowledged: {acknowledged}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scanner", default=SCANNER, help="scanner host stimulus endpoint")
    parser.add_argument("--session", default="sub-01_ses-01")
    parser.add_argument("--run", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="no PsychoPy: send events on a simulated timeline")
    args = parser.parse_args()
    (run_dry if args.dry_run else run_psychopy)(args.scanner, args.session, args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
