"""Revising a live run's events (RealtimeGLM.revise_events): the onsets the stimulus computer reported replace the
planned ones mid-run, and the result is the run that would have been fitted with those onsets from the start."""

from __future__ import annotations

import numpy as np
import pytest

from rt_mindeye.glm.config import RealtimeConfig
from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.errors import GLMInputError
from rt_mindeye.glm.estimator import GLMSingle
from rt_mindeye.glm.realtime import RealtimeGLM

GAP = 15  # a missing volume inside the run: the AR(1) chain restarts there, the rebuild must too


@pytest.fixture(scope="module")
def calibrated(synthetic_session):
    s = synthetic_session
    return GLMSingle(model="d").fit(s.runs[:3], s.events[:3], s.tr).calibration_


def subset(events: RunEvents, keep) -> RunEvents:
    keep = np.asarray(keep)
    return RunEvents(events.onsets[keep], events.durations[keep], tuple(events.trial_types[i] for i in keep))


class Lockstep:
    """Two estimators fed the same volumes: ``a`` starts with one set of events and is revised, ``b`` starts with
    the events ``a`` is revised to. Emissions are recorded per trial label (``a``'s trial indices mapped through
    ``a_labels`` / ``b_labels``, which change when ``a`` is revised)."""

    def __init__(self, calibration, session, run, a_events, b_events, config=None):
        self.data, self.motion, self.tr = session.runs[run], session.motion[run], session.tr
        n = self.data.shape[0]
        config = config or RealtimeConfig()
        self.a = RealtimeGLM(calibration, config).start_run(a_events, self.tr, n_volumes=n)
        self.b = RealtimeGLM(calibration, config).start_run(b_events, self.tr, n_volumes=n)
        self.a_labels, self.b_labels = list(range(len(a_events))), list(range(len(b_events)))
        self.a_out, self.b_out = [], []
        self.next = 0

    def feed(self, stop: int) -> None:
        for i in range(self.next, stop):
            if i == GAP:
                self.a.add_gap(i)
                self.b.add_gap(i)
                continue
            self.a_out += [(self.a_labels[e.trial], e) for e in self.a.add_volume(i, self.data[i], self.motion[i])]
            self.b_out += [(self.b_labels[e.trial], e) for e in self.b.add_volume(i, self.data[i], self.motion[i])]
        self.next = stop

    def finish(self):
        self.feed(self.data.shape[0])
        return self.a.end_run(), self.b.end_run()


def assert_same_estimate(x, y):
    assert x.n_volumes == y.n_volumes and x.last_volume == y.last_volume
    np.testing.assert_allclose(x.betas, y.betas, rtol=1e-5, atol=1e-5)


def test_jittered_actual_onsets_give_the_betas_of_a_fit_with_those_onsets(calibrated, synthetic_session):
    s = synthetic_session
    planned = s.events[3]
    jitter = np.random.default_rng(5).uniform(-1.2, 1.2, len(planned))
    actual = RunEvents(planned.onsets + jitter, planned.durations, planned.trial_types)
    assert np.all(np.diff(actual.onsets) > 0)
    pair = Lockstep(calibrated, s, 3, planned, actual)
    revise_at = int(planned.onsets[len(planned) // 2] / s.tr) + 2  # half the trials had estimates from the plan
    pair.feed(revise_at)
    assert pair.a_out
    revised = pair.a.revise_events(actual, origin=np.arange(len(actual)))
    # Every trial emitted so far was estimated on volumes where its own or a neighbour's onset moved.
    assert {e.trial for e in revised} == {label for label, _ in pair.a_out}
    assert all(e.kind == "revised" and e.n_volumes == pair.b.estimate(e.trial).n_volumes for e in revised)
    for e in revised:
        assert_same_estimate(e, pair.b.estimate(e.trial, "revised"))
    mark_a, mark_b = len(pair.a_out), len(pair.b_out)
    final_a, final_b = pair.finish()
    later_a, later_b = pair.a_out[mark_a:], pair.b_out[mark_b:]
    assert [(t, e.kind) for t, e in later_a] == [(t, e.kind) for t, e in later_b] and later_a
    for (_, x), (_, y) in zip(later_a, later_b):
        assert_same_estimate(x, y)
    assert [e.trial for e in final_a] == [e.trial for e in final_b]
    for x, y in zip(final_a, final_b):
        np.testing.assert_allclose(x.betas, y.betas, rtol=1e-6, atol=1e-6)
    # Not a vacuous comparison: the planned onsets give other betas.
    stale = RealtimeGLM(calibrated, RealtimeConfig()).start_run(planned, s.tr, n_volumes=s.runs[3].shape[0])
    for i in range(revise_at):
        if i != GAP:
            stale.add_volume(i, s.runs[3][i], s.motion[3][i])
    worst = max(np.abs(stale.estimate(e.trial).betas - e.betas).max() for e in revised)
    assert worst > 0.05


def test_an_event_reported_after_its_volumes_refits_the_affected_trials(calibrated, synthetic_session):
    s = synthetic_session
    shown = s.events[3]
    late = len(shown) - 3  # shown but not in the plan; its report comes 9 volumes after its onset
    planned = subset(shown, [j for j in range(len(shown)) if j != late])
    pair = Lockstep(calibrated, s, 3, planned, shown)
    pair.a_labels = [j for j in range(len(shown)) if j != late]
    onset_volume = int(np.ceil(shown.onsets[late] / s.tr))
    pair.feed(onset_volume + 9)
    origin = np.array([*range(late), -1, *range(late, len(planned))])
    revised = pair.a.revise_events(shown, origin=origin)
    pair.a_labels = list(range(len(shown)))
    kinds = {e.trial: e.kind for e in revised}
    assert kinds.pop(late) == "early"  # the late trial gets its estimate at once
    assert kinds and set(kinds.values()) == {"revised"}
    for e in revised:
        assert_same_estimate(e, pair.b.estimate(e.trial, e.kind))
    # Exactly the trials whose last estimate used a volume the late trial's response reaches are refitted; the
    # others' last estimates are already what a fit with the late trial gives.
    last = {}
    for label, e in pair.a_out:
        last[label] = e
    fresh = {}
    for label, e in pair.b_out:
        fresh[label] = e
    for label, e in last.items():
        if label in kinds:
            assert e.last_volume > onset_volume - 1
        else:
            assert_same_estimate(e, fresh[label])
    assert any(label not in kinds for label in last), "some emitted trials must be far enough to stay"
    mark_a, mark_b = len(pair.a_out), len(pair.b_out)
    final_a, final_b = pair.finish()
    for (ta, x), (tb, y) in zip(pair.a_out[mark_a:], pair.b_out[mark_b:]):
        assert ta == tb
        assert_same_estimate(x, y)
    for x, y in zip(final_a, final_b):
        np.testing.assert_allclose(x.betas, y.betas, rtol=1e-6, atol=1e-6)


def test_a_trial_reported_before_its_volumes_changes_no_emitted_estimate(calibrated, synthetic_session):
    s = synthetic_session
    shown = s.events[3]
    extra = len(shown) - 2
    planned = subset(shown, [j for j in range(len(shown)) if j != extra])
    pair = Lockstep(calibrated, s, 3, planned, shown)
    pair.a_labels = [j for j in range(len(shown)) if j != extra]
    pair.feed(int(shown.onsets[extra] / s.tr) - 1)  # reported while the stimulus is shown, before its volume
    assert pair.a.revise_events(shown) == []  # origin by identity: the unchanged trials are found
    pair.a_labels = list(range(len(shown)))
    mark_a, mark_b = len(pair.a_out), len(pair.b_out)
    pair.finish()
    assert [t for t, _ in pair.a_out[mark_a:]] == [t for t, _ in pair.b_out[mark_b:]]
    for (_, x), (_, y) in zip(pair.a_out[mark_a:], pair.b_out[mark_b:]):
        assert_same_estimate(x, y)


def test_a_planned_trial_not_shown_is_dropped(calibrated, synthetic_session):
    s = synthetic_session
    planned = s.events[3]
    skipped = 4
    shown = subset(planned, [j for j in range(len(planned)) if j != skipped])
    pair = Lockstep(calibrated, s, 3, planned, shown)
    pair.b_labels = [j for j in range(len(planned)) if j != skipped]
    pair.feed(int(planned.onsets[skipped + 1] / s.tr) + 7)
    assert skipped in {label for label, _ in pair.a_out}  # it was estimated from the plan before the news came
    origin = np.array([j for j in range(len(planned)) if j != skipped])
    revised = pair.a.revise_events(shown, origin=origin)
    pair.a_labels = pair.b_labels
    assert revised and all(e.kind == "revised" for e in revised)
    for e in revised:
        assert_same_estimate(e, pair.b.estimate(e.trial, "revised"))
    final_a, final_b = pair.finish()
    assert len(final_a) == len(final_b) == len(planned) - 1
    for x, y in zip(final_a, final_b):
        np.testing.assert_allclose(x.betas, y.betas, rtol=1e-6, atol=1e-6)


def test_revisions_are_validated(calibrated, synthetic_session):
    s = synthetic_session
    events = s.events[3]
    rt = RealtimeGLM(calibrated, RealtimeConfig()).start_run(events, s.tr)
    rt.add_volume(0, s.runs[3][0])
    with pytest.raises(GLMInputError, match="origin"):
        rt.revise_events(events, origin=[0, 1])
    with pytest.raises(GLMInputError, match="origin"):
        rt.revise_events(events, origin=[0] * len(events))
    backwards = RunEvents(events.onsets[::-1].copy(), events.durations, events.trial_types)
    with pytest.raises(GLMInputError, match="onset order"):
        rt.revise_events(backwards)
    # Before any volume a revision is just new events; labels-only changes keep everything.
    fresh = RealtimeGLM(calibrated, RealtimeConfig()).start_run(events, s.tr)
    assert fresh.revise_events(subset(events, range(3))) == []
    assert len(fresh.events_) == 3
    relabelled = RunEvents(events.onsets, events.durations, tuple("x" for _ in events.trial_types))
    assert rt.revise_events(relabelled, origin=np.arange(len(events))) == []
    assert rt.events_.trial_types[0] == "x"
