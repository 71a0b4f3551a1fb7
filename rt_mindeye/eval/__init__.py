"""rt_mindeye.eval: MindEye2's retrieval and reconstruction metrics (``metrics``) and offline feature extractors
(``features``)."""
