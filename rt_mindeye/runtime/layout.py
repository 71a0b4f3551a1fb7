"""Where everything of a session lands on disk, laid out like BIDS derivatives.

::

    SESSION/
      session.json                          what the session is (subject, runs, clock, software version)
      config.yaml                           the resolved configuration the services ran with
      sourcedata/dicom/                     the raw DICOMs exactly as received (the watcher's recorder)
      func/run-XX_bold.nii.gz               NIfTI per run (written when the run ends)
      func/run-XX_events.tsv                the events the run was analysed with
      derivatives/rt-mindeye/
        motion/run-XX_motion.tsv            6 rigid parameters + FD per volume, gaps marked
        events/run-XX_design.json           plan against the stimulus computer's reports, clock offset, notices
        betas/                              the trial-estimate journal (every estimate version, bit-exact)
        decoder/                            results.jsonl: results per trial estimate; feedback.journal and
                                            feedback.jsonl: what went back to the stimulus computer
        recon/run-XX_trial-YYY.png          reconstructions (and blurry images)
        gallery/index.html                  browsable gallery that updates as trials arrive
        timings.jsonl                       per-stage timings of every volume and trial
        bundles.jsonl                       calibration bundles loaded, reloaded and refused, and per run
      logs/                                 one log file per service

Only this module knows these paths; every service asks a :class:`SessionLayout` for them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rt_mindeye.errors import SessionError

DERIVATIVES = Path("derivatives") / "rt-mindeye"


@dataclass(frozen=True)
class SessionLayout:
    root: Path

    @property
    def session_json(self) -> Path:
        return self.root / "session.json"

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def dicom_dir(self) -> Path:
        return self.root / "sourcedata" / "dicom"

    @property
    def func_dir(self) -> Path:
        return self.root / "func"

    def bold_nifti(self, run: int) -> Path:
        return self.func_dir / f"run-{run:02d}_bold.nii.gz"

    def events_tsv(self, run: int) -> Path:
        return self.func_dir / f"run-{run:02d}_events.tsv"

    @property
    def derivatives(self) -> Path:
        return self.root / DERIVATIVES

    def motion_tsv(self, run: int) -> Path:
        return self.derivatives / "motion" / f"run-{run:02d}_motion.tsv"

    @property
    def design_dir(self) -> Path:
        return self.derivatives / "events"

    @property
    def betas_dir(self) -> Path:
        return self.derivatives / "betas"

    @property
    def decoder_dir(self) -> Path:
        return self.derivatives / "decoder"

    @property
    def decoder_results(self) -> Path:
        return self.decoder_dir / "results.jsonl"

    def read_decoder_results(self) -> list[dict[str, Any]]:
        """Every record the decoder wrote so far (retrieval per estimate, superseded estimates, reconstruction
        events), in order; a line still being written is left for the next read."""
        return self.read_jsonl(self.decoder_results)

    @property
    def bundles_jsonl(self) -> Path:
        """Which calibration bundle each service loaded, staged, refused and switched to, and from which run."""
        return self.derivatives / "bundles.jsonl"

    def bundles_by_run(self, service: str = "decoder") -> dict[int, list[str]]:
        """The bundle ids ``service`` used for each run (from ``bundles.jsonl``'s ``run`` records)."""
        runs: dict[int, list[str]] = {}
        for record in self.read_jsonl(self.bundles_jsonl):
            if record.get("service") == service and record.get("event") == "run":
                ids = runs.setdefault(int(record["run"]), [])
                if record["bundle_id"] not in ids:
                    ids.append(record["bundle_id"])
        return runs

    @property
    def repeats_journal(self) -> Path:
        """Every estimate of a trial with a known image, for the repeat averages (decoder.average_repeats)."""
        return self.decoder_dir / "repeats.journal"

    @property
    def feedback_journal(self) -> Path:
        """Every Feedback sent to the stimulus computer, bit-exact (the reliable channel's outbox)."""
        return self.decoder_dir / "feedback.journal"

    @property
    def feedback_jsonl(self) -> Path:
        """One record per trial: what its feedback was, or why none was sent."""
        return self.decoder_dir / "feedback.jsonl"

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        """The records of a JSON-lines file written as the session runs; a line still being written is left for
        the next read."""
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    @property
    def recon_dir(self) -> Path:
        return self.derivatives / "recon"

    def recon_png(self, run: int, trial: int, kind: str = "recon") -> Path:
        return self.recon_dir / f"run-{run:02d}_trial-{trial:03d}_{kind}.png"

    @property
    def gallery_dir(self) -> Path:
        return self.derivatives / "gallery"

    @property
    def timings_jsonl(self) -> Path:
        return self.derivatives / "timings.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def create(self) -> "SessionLayout":
        for folder in (self.dicom_dir, self.func_dir, self.derivatives / "motion", self.betas_dir, self.decoder_dir,
                       self.recon_dir, self.gallery_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def free_bytes(self) -> int:
        probe = self.root if self.root.exists() else self.root.parent
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        os.replace(tmp, path)

    def read_session(self) -> dict[str, Any]:
        try:
            return json.loads(self.session_json.read_text())
        except FileNotFoundError as exc:
            raise SessionError(self.session_json, "no session.json: not an rt-mindeye session folder") from exc
        except json.JSONDecodeError as exc:
            raise SessionError(self.session_json, f"invalid JSON at line {exc.lineno}") from exc
