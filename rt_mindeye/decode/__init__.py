"""rt_mindeye.decode: retrieval, SDXL-unCLIP reconstruction and the service-facing Decoder.

Modules: ``config`` (DecodeConfig, ReconstructConfig), ``retrieval`` (Retriever), ``unclip`` (model configs and
builders), ``schedulers`` (make_scheduler), ``reconstruct`` (UnclipReconstructor, BlurryDecoder, blend), ``accel``
(torch.compile / optional torch-tensorrt), ``decoder`` (Decoder, DecodeResult). Checkpoint conversion lives in
:mod:`rt_mindeye.convert.unclip`.
"""

from rt_mindeye.decode.config import DecodeConfig, ReconstructConfig

__all__ = ["DecodeConfig", "ReconstructConfig"]
