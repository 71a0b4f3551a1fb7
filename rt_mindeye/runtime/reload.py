"""Reload between runs: a running scanner host and decoder take a new calibration bundle (and the decoder a new
reconstruction policy) without a restart.

The operator asks with ``rt-mindeye reload --config FILE --bundle DIR [--recon-policy P]`` (or
``rt-mindeye calibrate ... --reload``): a ``StatusRequest(query="reload", args={...})`` goes to the decoder's status
port and to the scanner host's control port. Each service **validates** the new bundle at once, the way it validates
its bundle at start-up (it opens, it is this subject's, its grid is the grid the scanner is sending, the decoder's
checkpoint builds and fits its candidates, the unCLIP checkpoint attends to its tokens), and answers ``accepted`` or
``refused`` with the named error; a refused bundle changes nothing. An accepted one is **staged** and takes effect
**between runs**: the scanner host switches when no run is in progress, and stamps every estimate it makes with the
bundle's id (``TrialBetas.bundle_id``); the decoder decodes each estimate with the bundle that made it, so the two
can never disagree, a trial already journaled is decoded with its own bundle, and nothing is lost or decoded twice
(the reliable stream is untouched by a reload).

Every load, refusal and switch is recorded in ``derivatives/rt-mindeye/bundles.jsonl``
(``SessionLayout.bundles_jsonl``, ``SessionLayout.bundles_by_run()``), with the run it applied from: the session says
which bundle made and decoded which run, and a restarted service continues with the bundle and policy it last switched
to (unless the YAML file now names another bundle than at its last start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.transport import protocol

log = logging.getLogger("rt_mindeye.reload")

#: Files whose bytes identify a bundle (small); the checkpoints are identified by their size.
_ID_FILES = ("bundle.json", "glm/decoder_index.npy", "glm/calibration.json")


def bundle_id(bundle: CalibrationBundle) -> str:
    """A short content id of ``bundle``: equal for copies of one bundle, different for two calibrations."""
    digest = hashlib.sha256()
    for name in _ID_FILES:
        path = bundle.root / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    for path in sorted(bundle.model_dir.glob("*")) if bundle.model_dir.is_dir() else ():
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def refusal(exc: Exception) -> dict[str, str]:
    """The details of a refused request: the error's type and message."""
    return {"error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__}


class BundleHistory:
    """``bundles.jsonl``: one record per event of either service, appended line by line (both services of one host
    may share it): ``start`` (the bundle a service started with), ``staged`` / ``refused`` (a reload request),
    ``applied`` (switched to a bundle), ``policy_applied`` (a reconstruction policy), ``run`` (a run's estimates are
    made or decoded with a bundle)."""

    def __init__(self, layout: SessionLayout, service: str):
        self.layout = layout
        self.service = service
        self._lock = threading.Lock()

    def write(self, event: str, **fields) -> dict:
        record = {"service": self.service, "event": event, "at": time.time(), **fields}
        with self._lock, self.layout.bundles_jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def records(self) -> list[dict]:
        return self.layout.read_jsonl(self.layout.bundles_jsonl)

    def known_paths(self) -> dict[str, Path]:
        """Every bundle id this session has recorded, with its path."""
        return {r["bundle_id"]: Path(r["bundle"]) for r in self.records() if r.get("bundle_id") and r.get("bundle")}

    def current(self, configured: Path) -> Path:
        """The bundle to start with: the one this service last switched to (a restart after a reload), unless the
        configuration names another bundle than at that service's last start (the operator changed it)."""
        mine = [r for r in self.records() if r["service"] == self.service and r["event"] in ("start", "applied")]
        starts = [r for r in mine if r["event"] == "start"]
        if not mine or starts and starts[-1].get("configured") != str(configured):
            return Path(configured)
        return Path(mine[-1]["bundle"])

    def current_policy(self, configured: tuple[str, int]) -> tuple[str, int]:
        """The reconstruction policy to start with: the last one applied by a reload, unless the configuration
        changed since this service's last start."""
        mine = [r for r in self.records() if r["service"] == self.service]
        starts = [r for r in mine if r["event"] == "start"]
        applied = [r for r in mine if r["event"] == "policy_applied"]
        if not applied or not starts or starts[-1].get("configured_policy") != list(configured):
            return configured
        return applied[-1]["recon_policy"], int(applied[-1]["recon_max_pending"])

    def start(self, loaded_path: Path, loaded_id: str, configured: Path, **extra) -> None:
        self.write("start", bundle=str(loaded_path), bundle_id=loaded_id, configured=str(configured), **extra)

    def staged(self) -> dict | None:
        """A reload accepted but not yet applied when this service stopped (it is staged again on restart)."""
        pending = None
        for r in self.records():
            if r["service"] != self.service:
                continue
            if r["event"] == "staged":
                pending = r
            elif r["event"] in ("applied", "policy_applied"):
                pending = None
        return pending


def control_handler(service: str, reload, status):
    """A :class:`~rt_mindeye.transport.reqrep.StatusServer` handler: ``reload(args) -> details`` (raises a
    RtMindEyeError to refuse), ``status() -> details``."""

    def handle(request):
        if request.query == "reload":
            try:
                details = reload(dict(request.args))
            except (RtMindEyeError, OSError, ValueError) as exc:
                log.warning("%s: reload refused: %s", service, exc)
                return protocol.STATE_REFUSED, refusal(exc)
            return protocol.STATE_ACCEPTED, {k: str(v) for k, v in details.items()}
        if request.query in ("status", "ping"):
            return protocol.STATE_READY, {k: str(v) for k, v in status().items()}
        return protocol.STATE_REFUSED, {"error": f"unknown query {request.query!r}", "error_type": "ValueError"}

    return handle


@dataclass(frozen=True)
class ReloadAnswer:
    service: str
    state: str
    details: dict[str, str]

    @property
    def accepted(self) -> bool:
        return self.state == protocol.STATE_ACCEPTED


def request_reload(config, *, bundle: Path | None = None, recon_policy: str | None = None,
                   recon_max_pending: int | None = None, timeout_s: float = 120.0) -> list[ReloadAnswer]:
    """Ask the running decoder, then the scanner host, to take ``bundle`` (and the decoder ``recon_policy``) from
    the next run. The decoder is asked first: a bundle it cannot decode with is never given to the scanner host.

    Raises :class:`~rt_mindeye.errors.TransportTimeout` when a service does not answer within ``timeout_s``.
    """
    from rt_mindeye.transport.config import client_security
    from rt_mindeye.transport.reqrep import LazyPirateClient

    t = config.transport
    decoder_args = {}
    if bundle is not None:
        decoder_args["bundle"] = str(Path(bundle).resolve())
    if recon_policy is not None:
        decoder_args["recon_policy"] = recon_policy
    if recon_max_pending is not None:
        decoder_args["recon_max_pending"] = str(recon_max_pending)
    answers = []
    targets = [("decoder", "decoder_status", decoder_args)]
    if bundle is not None:
        targets.append(("scanner", "scanner_control", {"bundle": decoder_args["bundle"]}))
    for service, endpoint, args in targets:
        if not args:
            continue
        # One long wait, no retry: validating a bundle loads its model (seconds for MindEye2 on a GPU host).
        with LazyPirateClient(t.connect_endpoint(endpoint), session=config.session.id, service="operator",
                              client_security=client_security(t, "console", service), timeout_s=timeout_s,
                              retries=1) as client:
            reply = client.request("reload", args)
        answers.append(ReloadAnswer(service, reply.state, dict(reply.details)))
        if reply.state != protocol.STATE_ACCEPTED:
            break  # the decoder refused: the scanner host keeps its bundle too
    return answers


# --- the scanner host -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannerBundle:
    """Everything the scanner host takes from a bundle, loaded and checked."""

    path: Path
    id: str
    bundle: CalibrationBundle
    calibration: object  # GLMCalibration
    reference: object  # Volume
    glm_mask: object  # np.ndarray
    decoder_index: object  # np.ndarray

    @classmethod
    def load(cls, path: Path, subject: str, volume=None) -> "ScannerBundle":
        """Open and check ``path`` (this subject; the grid of ``volume``, the last one received, if any)."""
        import numpy as np

        from rt_mindeye.errors import BundleMismatchError
        from rt_mindeye.glm.estimator import GLMCalibration

        bundle = CalibrationBundle.open(path)
        bundle.check(subject=subject, volume=volume)
        calibration = GLMCalibration.load(bundle.glm_dir)
        reference = bundle.reference()
        glm_mask = bundle.glm_mask()
        decoder_index = bundle.decoder_index()
        if tuple(reference.shape) != tuple(glm_mask.shape):
            raise BundleMismatchError(bundle.root, f"reference grid {reference.shape} and GLM mask "
                                                   f"{glm_mask.shape} differ")
        n_glm = int(np.count_nonzero(glm_mask))
        if decoder_index.size and (int(decoder_index.max()) >= n_glm or int(decoder_index.min()) < 0):
            raise BundleMismatchError(bundle.root, f"decoder voxels index outside the {n_glm} GLM voxels")
        if decoder_index.size != bundle.info.n_voxels:
            raise BundleMismatchError(bundle.root, f"{decoder_index.size} decoder voxels, bundle.json says "
                                                   f"{bundle.info.n_voxels}")
        return cls(Path(path), bundle_id(bundle), bundle, calibration, reference, glm_mask, decoder_index)


class ScannerBundles:
    """The scanner host's bundle now and the one staged for the next run (set from the control thread)."""

    def __init__(self, current: ScannerBundle, history: BundleHistory, subject: str):
        self.current = current
        self.history = history
        self.subject = subject
        self.last_volume = None  # geometry a reloaded bundle must match
        self._staged: ScannerBundle | None = None
        self._runs_noted: set[int] = set()
        self._lock = threading.Lock()

    def reload(self, args: dict[str, str]) -> dict:
        if "bundle" not in args:
            raise ValueError("reload: no bundle given")
        try:
            staged = ScannerBundle.load(Path(args["bundle"]), self.subject, self.last_volume)
        except (RtMindEyeError, OSError, ValueError) as exc:
            self.history.write("refused", bundle=args["bundle"], **refusal(exc))
            raise
        with self._lock:
            self._staged = staged
        self.history.write("staged", bundle=str(staged.path), bundle_id=staged.id)
        log.info("bundle %s (%s) staged: it applies from the next run", staged.path, staged.id)
        return {"bundle": staged.path, "bundle_id": staged.id, "applies": "from the next run"}

    def status(self) -> dict:
        with self._lock:
            staged = self._staged
        return {"bundle": self.current.path, "bundle_id": self.current.id,
                "staged": staged.id if staged is not None else ""}

    def take_staged(self) -> ScannerBundle | None:
        """The staged bundle, now made current (call between runs only), or None."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            self.current = staged
            self._runs_noted = set()
            self.history.write("applied", bundle=str(staged.path), bundle_id=staged.id)
            log.info("switched to bundle %s (%s)", staged.path, staged.id)
        return staged

    def note_run(self, run: int) -> None:
        """Record (once per run and bundle) that ``run``'s estimates are made with the current bundle."""
        if run not in self._runs_noted:
            self._runs_noted.add(run)
            self.history.write("run", run=run, bundle=str(self.current.path), bundle_id=self.current.id)


# --- the decoder ------------------------------------------------------------------------------------------------------


class UnknownBundleError(RtMindEyeError):
    """A trial estimate was made with a bundle this decoder was never given (no reload reached it)."""

    def __init__(self, bundle_id: str):
        self.bundle_id = bundle_id
        super().__init__(f"the estimate was made with bundle {bundle_id}, which this decoder has not loaded: give it "
                         f"with `rt-mindeye reload --bundle DIR`")


class DecoderBundles:
    """The decoder's calibration bundles by id: the one in use, those accepted by a reload (validated and loaded at
    once) and those recorded in this session (loaded when an estimate needs one); plus a staged reconstruction
    policy. ``build(bundle) -> (decoder, reconstruction decoder or None)`` makes the decoding side of a bundle and
    raises when it cannot."""

    KEEP_LOADED = 3

    def __init__(self, build, history: BundleHistory, subject: str, configured: Path, default_policy: tuple[str, int]):
        self._build = build
        self.history = history
        self.subject = subject
        self.known: dict[str, Path] = history.known_paths()
        self.loaded: dict[str, tuple] = {}
        self._lock = threading.Lock()
        path = history.current(configured)
        bundle = self._open(path)
        self.current_id = bundle_id(bundle)
        self.current_path = Path(path)
        self.loaded[self.current_id] = build(bundle)
        self.known[self.current_id] = self.current_path
        self.policy = history.current_policy(tuple(default_policy))
        history.start(path, self.current_id, configured, configured_policy=list(default_policy),
                      recon_policy=self.policy[0])
        self._staged_policy: tuple[str, int] | None = None
        self.last_run: int | None = None
        if (pending := history.staged()) is not None and pending.get("recon_policy"):
            self._staged_policy = (pending["recon_policy"], int(pending.get("recon_max_pending", default_policy[1])))

    def _open(self, path: Path) -> CalibrationBundle:
        bundle = CalibrationBundle.open(path)
        bundle.check(subject=self.subject, volume=None)
        return bundle

    @property
    def current(self) -> tuple:
        with self._lock:
            return self.loaded[self.current_id]

    # --- control thread ---------------------------------------------------------------------------------------------

    def reload(self, args: dict[str, str]) -> dict:
        """Validate and stage a new bundle and/or reconstruction policy (refusals raise and are recorded)."""
        from rt_mindeye.transport.policy import ReconstructionQueue

        details: dict[str, object] = {}
        try:
            policy = None
            if "recon_policy" in args or "recon_max_pending" in args:
                policy = (args.get("recon_policy", self.policy[0]),
                          int(args.get("recon_max_pending", self.policy[1])))
                ReconstructionQueue(*policy)  # a ConfigError names the bad value
            if "bundle" in args:
                path = Path(args["bundle"])
                bundle = self._open(path)
                staged_id = bundle_id(bundle)
                built = self._build(bundle)  # the model loads and fits its candidates, or this raises
                with self._lock:
                    self.loaded[staged_id] = built
                    self.known[staged_id] = path
                    self._trim()
                details.update(bundle=path, bundle_id=staged_id)
        except (RtMindEyeError, OSError, ValueError) as exc:
            self.history.write("refused", bundle=args.get("bundle"), recon_policy=args.get("recon_policy"),
                               **refusal(exc))
            raise
        if policy is not None:
            with self._lock:
                self._staged_policy = policy
            details.update(recon_policy=policy[0], recon_max_pending=policy[1])
        self.history.write("staged", **{k: str(v) for k, v in details.items()})
        details["applies"] = "from the next run (a bundle: from the first estimate the scanner host makes with it)"
        log.info("reload staged: %s", details)
        return details

    def status(self) -> dict:
        return {"bundle": self.current_path, "bundle_id": self.current_id, "recon_policy": self.policy[0]}

    def _trim(self) -> None:
        while len(self.loaded) > self.KEEP_LOADED:
            oldest = next(k for k in self.loaded if k != self.current_id)
            del self.loaded[oldest]

    # --- decoding thread --------------------------------------------------------------------------------------------

    def prepare(self, msg, trial_decoder) -> list:
        """Before decoding ``msg``: switch to the bundle that made it, and at a new run apply a staged
        reconstruction policy. Returns the reconstruction outcomes a policy change drops; raises
        :class:`UnknownBundleError` for an estimate of a bundle this decoder cannot find."""
        outcomes = []
        switched = False
        if msg.bundle_id and msg.bundle_id != self.current_id:
            decoder, reconstruction = self._decoders_for(msg.bundle_id)
            trial_decoder.use(decoder, reconstruction)
            self.current_id = msg.bundle_id
            self.current_path = self.known[msg.bundle_id]
            self.history.write("applied", bundle=str(self.current_path), bundle_id=self.current_id, run=msg.run)
            log.info("run %d: decoding with bundle %s (%s)", msg.run, self.current_path, self.current_id)
            switched = True
        new_run = msg.run != self.last_run
        with self._lock:
            policy, self._staged_policy = (self._staged_policy, None) if (new_run or switched) else (None,
                                                                                                    self._staged_policy)
        if policy is not None:
            outcomes = trial_decoder.set_policy(*policy)
            self.policy = policy
            self.history.write("policy_applied", recon_policy=policy[0], recon_max_pending=policy[1], run=msg.run)
            log.info("run %d: reconstruction policy %s (%d waiting at most)", msg.run, *policy)
        if new_run or switched:
            self.history.write("run", run=msg.run, bundle=str(self.current_path), bundle_id=self.current_id,
                               recon_policy=self.policy[0])
        self.last_run = msg.run
        return outcomes

    def _decoders_for(self, wanted: str) -> tuple:
        with self._lock:
            built = self.loaded.get(wanted)
        if built is not None:
            return built
        path = self.known.get(wanted) or self.history.known_paths().get(wanted)
        if path is None:
            raise UnknownBundleError(wanted)
        bundle = self._open(path)
        if bundle_id(bundle) != wanted:
            raise UnknownBundleError(wanted)  # the folder now holds another calibration
        built = self._build(bundle)
        with self._lock:
            self.loaded[wanted] = built
            self.known[wanted] = path
            self._trim()
        return built
