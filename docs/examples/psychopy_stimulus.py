"""Example: report stimuli from a PsychoPy experiment to the rt-mindeye scanner host, and show the participant what
the decoder made of each trial (closed loop).

Copy ``rt_mindeye/transport/stimulus_client.py`` next to this script on the stimulus computer (it needs only pyzmq,
which ships with PsychoPy's standalone installer; otherwise ``pip install pyzmq``). The scanner host listens on
port 5560 (``transport.port_stimulus``); beyond loopback it needs CURVE keys, passed as ``curve=(client .key_secret,
server .key)``.

Timing: onsets are seconds after the scanner trigger on PsychoPy's clock, taken from ``win.flip()`` (the moment the
stimulus actually appeared). The scanner host anchors time 0 of the run at the acquisition time of the run's first
volume, so the events land on the scanner's acquisition clock.

Feedback: the decoder host sends each trial's result back (``decoder.feedback`` in the session YAML; port 5562,
``transport.port_feedback``): the top-5 retrieved images, the top-1 score and the reconstruction as PNG bytes. The
client receives it on a background thread; ``client.feedback(trial, timeout_s)`` waits at most that long, so the
experiment's timing never depends on the decoder. A result later than the decoder's deadline arrives marked late (or as
a late notice without a result, or not at all, as the feedback policy says); this script then shows a placeholder.
Trials are numbered 0, 1, ... in onset order within the run, as the decoder numbers them. ``feedback_state`` keeps the
last acknowledged feedback in a file, so if this script is restarted mid-session it gets exactly the feedback it
missed.

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
DECODER = "tcp://127.0.0.1:5562"
TRIGGER_KEY = "5"          # most scanners send the trigger as a "5" key press
STIM_DURATION_S = 3.0
ISI_S = 1.0
FEEDBACK_WAIT_S = 4.0      # the early estimate needs a few volumes after the onset; never wait longer than this
FEEDBACK_SHOW_S = 1.5
PLACEHOLDER = "..."
IMAGES = ["shared0001.png", "shared0002.png", "shared0003.png"]


def describe(item) -> str:
    """One line about a trial's feedback (or its absence)."""
    if item is None:
        return "no feedback in time"
    if not item.has_result:
        return f"late notice: {item.text}"
    late = " (late)" if item.late else ""
    averaged = f", average of {item.n_repeats} showings" if item.averaged else ""
    return f"{item.topk_labels[0]} (score {item.score:.2f}{averaged}){late}"


def show_feedback(win, item) -> None:
    """The decoder's top-1 image with its reconstruction, or a placeholder when there is nothing (in time)."""
    import io

    from PIL import Image
    from psychopy import core, visual  # noqa: PLC0415

    stims = [visual.TextStim(win, describe(item), pos=(0, -0.4), height=0.03)]
    if item is not None and item.has_result and not item.late:
        stims.append(visual.ImageStim(win, item.topk_labels[0], pos=(-0.25, 0.05), size=(0.4, 0.4)))
        if item.image_png:
            picture = Image.open(io.BytesIO(item.image_png)).convert("RGB")
            stims.append(visual.ImageStim(win, picture, pos=(0.25, 0.05), size=(0.4, 0.4)))
    else:
        stims.append(visual.TextStim(win, PLACEHOLDER, height=0.08))
    for stim in stims:
        stim.draw()
    win.flip()
    core.wait(FEEDBACK_SHOW_S)


def run_psychopy(endpoint: str, decoder: str, session: str, run: int) -> None:
    from psychopy import core, event, visual  # noqa: PLC0415 - only on the stimulus computer

    win = visual.Window(fullscr=True, color="grey", units="height")
    # win.flip() returns its time on core.getTime's clock, so the client uses that clock too.
    client = StimulusClient(endpoint, session=session, run=run, clock=core.getTime, feedback_endpoint=decoder,
                            feedback_state=f"{session}_feedback.state")
    fixation = visual.TextStim(win, "+", height=0.05)
    fixation.draw()
    win.flip()
    event.waitKeys(keyList=[TRIGGER_KEY])            # the scanner's first trigger pulse
    trigger_time = client.trigger()                  # time 0 of the run on this clock
    for trial, image in enumerate(IMAGES):           # 0, 1, ...: the decoder's trial numbers
        stim = visual.ImageStim(win, image, size=(0.8, 0.8))
        stim.draw()
        shown_at = win.flip()                        # returns when the image is on screen
        client.event(trial=trial, onset=shown_at - trigger_time, duration=STIM_DURATION_S,
                     trial_type="image", stim_file=image)
        core.wait(STIM_DURATION_S)
        fixation.draw()
        win.flip()
        show_feedback(win, client.feedback(trial=trial, timeout_s=FEEDBACK_WAIT_S))
        fixation.draw()
        win.flip()
        core.wait(ISI_S)
    client.close(timeout_s=2.0)                     # waits (bounded) for the scanner host's acknowledgements
    win.close()


def run_dry(endpoint: str, decoder: str | None, session: str, run: int) -> None:
    client = StimulusClient(endpoint, session=session, run=run, feedback_endpoint=decoder)
    client.trigger()
    for trial, image in enumerate(IMAGES):
        client.event(trial=trial, duration=STIM_DURATION_S, trial_type="image", stim_file=image)  # onset = now
        time.sleep(0.2)
    if decoder is not None:
        for trial, image in enumerate(IMAGES):
            print(f"trial {trial} ({image}): {describe(client.feedback(trial=trial, timeout_s=0.5))}")
    acknowledged = client.close(timeout_s=2.0)
    print(f"sent {len(IMAGES)} events to {endpoint}; all acknowledged: {acknowledged}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scanner", default=SCANNER, help="scanner host stimulus endpoint")
    parser.add_argument("--decoder", default=None, help=f"decoder host feedback endpoint (e.g. {DECODER}); "
                                                        "without it, no feedback")
    parser.add_argument("--session", default="sub-01_ses-01")
    parser.add_argument("--run", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="no PsychoPy: send events on a simulated timeline")
    args = parser.parse_args()
    if args.dry_run:
        run_dry(args.scanner, args.decoder, args.session, args.run)
    else:
        run_psychopy(args.scanner, args.decoder or DECODER, args.session, args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
