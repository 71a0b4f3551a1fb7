"""Process entry point of the decoder service: `python -m services.decoder --config configs/NAME.yaml`."""

from __future__ import annotations

import sys

from rt_mindeye.runtime.entry import service_main

if __name__ == "__main__":
    sys.exit(service_main("decoder"))
