"""rt-mindeye: real-time, scanner-side fMRI-to-image decoding.

Subpackages follow the pipeline stages: ``ingest`` (DICOM readers, watcher), ``phantom`` (simulated sessions),
``replay`` (scanner emulator), ``preprocess`` (motion correction, masks), ``glm`` (single-trial betas), ``model``
(MindEye2), ``convert`` (checkpoint conversion), ``decode`` (retrieval, reconstruction), ``eval`` (metrics),
``transport`` (ZeroMQ messages), ``console`` (operator view) and ``calibration`` (the calibration workflow).
Stages share only :mod:`rt_mindeye.volume`, :mod:`rt_mindeye.config`, :mod:`rt_mindeye.errors` and
:mod:`rt_mindeye.timing`; :mod:`rt_mindeye.runtime` wires them together.
"""

__version__ = "0.1.0"
