"""The feedback policy: which of a trial's results goes back to the stimulus computer, when, and as what.

:class:`FeedbackPolicy` holds no sockets: the decoder service offers it every retrieval result (with the repeat
average, if any) and every reconstruction outcome, and it answers, once per trial, with a :class:`FeedbackDecision`:
the :class:`~rt_mindeye.transport.messages.Feedback` to send (or None) and the record for ``decoder/feedback.jsonl``
that says what was sent, or why nothing was. Settings: ``decoder.feedback`` (:class:`FeedbackConfig`).

* which estimate: ``first`` (whichever result comes first) or the first of one kind (``early``, ``refined``), with the
  trial's ``final`` estimate standing in for a kind it never got;
* which content: top-k labels and scores, the top-1 score, and the image: none, the retrieval result's blurry image
  (fast), or the unCLIP reconstruction (waits for the reconstruction worker; a trial the reconstruction policy skips
  or whose reconstruction fails is fed back without an image, with the reason in ``text``);
* late: a result ready more than ``deadline_s`` after the acquisition of the estimate's last volume is ``late``, and
  is then shown anyway (marked), replaced by a placeholder notice, or skipped (recorded).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rt_mindeye.runtime.config import FeedbackConfig
from rt_mindeye.transport import protocol
from rt_mindeye.transport.messages import DecodeResult, Feedback

log = logging.getLogger("rt_mindeye.decoder")

FINAL = "final"
NOT_RECONSTRUCTED = ("skipped", "failed")


@dataclass(frozen=True)
class FeedbackDecision:
    """What became of one trial's feedback: ``message`` to send (None: nothing is sent) and its ``record``."""

    run: int
    trial: int
    message: Feedback | None
    record: dict = field(default_factory=dict)


class FeedbackPolicy:
    """Decides each trial's feedback from the decoder's results (thread-safe: the reconstruction worker offers too).

    ``reconstructs``: the decoder runs unCLIP reconstructions (otherwise ``image: reconstruction`` falls back to the
    blurry image). ``decided``: trials whose feedback was decided before a restart (they are never decided again).
    """

    def __init__(self, config: FeedbackConfig, *, session: str, reconstructs: bool,
                 decided: set[tuple[int, int]] | None = None):
        self.config = config
        self.session = session
        self.image = config.image
        if self.image == "reconstruction" and not reconstructs:
            log.warning("decoder.feedback.image is 'reconstruction' but the decoder does not reconstruct: the blurry "
                        "image is fed back instead")
            self.image = "blurry"
        self._decided: set[tuple[int, int]] = set(decided or ())
        self._waiting: dict[tuple[int, int], DecodeResult] = {}  # retrieval results waiting for their reconstruction
        self._lock = threading.Lock()

    def decided(self, run: int, trial: int) -> bool:
        with self._lock:
            return (run, trial) in self._decided

    def _wanted(self, kind: str) -> bool:
        return self.config.estimate == "first" or kind == self.config.estimate or kind == FINAL

    def on_retrieval(self, result: DecodeResult, averaged: DecodeResult | None = None,
                     now: float | None = None) -> FeedbackDecision | None:
        """A trial estimate's retrieval result (and its repeat average) is ready."""
        now = time.time() if now is None else now
        shown = averaged if (averaged is not None and self.config.averaged) else result
        key = (result.run, result.trial)
        with self._lock:
            if key in self._decided or not self._wanted(result.estimate_kind):
                return None
            if self.image == "reconstruction":
                if result.policy_decision not in NOT_RECONSTRUCTED:
                    self._waiting[key] = shown  # decided when its reconstruction ends
                    return None
                text = f"no reconstruction: {result.policy_decision} by policy {result.policy}"
                return self._decide(shown, None, result.retrieval_done_at or now, text)
            image = result.reconstruction_path if self.image == "blurry" else None
            return self._decide(shown, image, result.retrieval_done_at or now)

    def on_reconstruction(self, run: int, trial: int, kind: str, decision: str, message: DecodeResult | None,
                          reason: str = "", now: float | None = None) -> FeedbackDecision | None:
        """How one estimate's reconstruction ended (``reconstructed``, ``skipped``, ``superseded``, ``failed``)."""
        if self.image != "reconstruction" or decision == "superseded":
            return None  # a superseded estimate's trial is fed back from the newer estimate's reconstruction
        now = time.time() if now is None else now
        key = (run, trial)
        with self._lock:
            shown = self._waiting.get(key)
            if key in self._decided or shown is None or not self._wanted(kind):
                return None
            del self._waiting[key]
            if decision == "reconstructed" and message is not None:
                return self._decide(shown, message.reconstruction_path, message.reconstruction_done_at or now)
            return self._decide(shown, None, now, f"no reconstruction: {decision}" + (f" ({reason})" if reason
                                                                                    else ""))

    def drop_waiting(self, reason: str) -> list[FeedbackDecision]:
        """Trials still waiting for a reconstruction when the decoder stops: fed back without an image."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            return [self._decide(shown, None, time.time(), f"no reconstruction: {reason}")
                    for shown in waiting.values() if (shown.run, shown.trial) not in self._decided]

    # --- building -------------------------------------------------------------------------------------------------

    def _decide(self, shown: DecodeResult, image_path: str | None, ready_at: float,
                text: str = "") -> FeedbackDecision:
        """Called with the lock held."""
        c = self.config
        self._decided.add((shown.run, shown.trial))
        late = ready_at - shown.acquisition_time > c.deadline_s
        status = protocol.FEEDBACK_LATE if late else protocol.FEEDBACK_ON_TIME
        record = {"run": shown.run, "trial": shown.trial, "kind": shown.estimate_kind,
                  "version": shown.estimate_version, "status": status, "averaged": shown.averaged,
                  "n_repeats": shown.n_repeats, "ready_s": ready_at - shown.acquisition_time}
        if late and c.late == "skip":
            record.update(sent=False, reason=f"late: ready {ready_at - shown.acquisition_time:.2f} s after "
                                             f"acquisition, deadline {c.deadline_s:g} s (late: skip)")
            return FeedbackDecision(shown.run, shown.trial, None, record)
        common = dict(session=self.session, run=shown.run, trial=shown.trial, trial_type=shown.trial_type,
                      estimate_kind=shown.estimate_kind, estimate_version=shown.estimate_version, status=status,
                      acquisition_time=shown.acquisition_time, deadline_s=c.deadline_s, result_done_at=ready_at)
        if late and c.late == "placeholder":
            message = Feedback(**common, text=c.late_text)
            record.update(sent=True, content="placeholder")
            return FeedbackDecision(shown.run, shown.trial, message, record)
        k = min(c.top_k, len(shown.topk_labels))
        image_path = image_path if self.image != "none" else None
        message = Feedback(**common, topk_labels=shown.topk_labels[:k], topk_scores=shown.topk_scores[:k],
                           score=shown.topk_scores[0] if k else float("nan"), averaged=shown.averaged,
                           n_repeats=shown.n_repeats, image_path=image_path,
                           image_png=self._png(image_path) if c.image_bytes else None, text=text)
        record.update(sent=True, content="result", image=image_path)
        if text:
            record["note"] = text
        return FeedbackDecision(shown.run, shown.trial, message, record)

    @staticmethod
    def _png(path: str | None) -> np.ndarray | None:
        if path is None:
            return None
        try:
            return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        except OSError as exc:
            log.warning("feedback image %s cannot be read (%s): sent without its bytes", path, exc)
            return None
