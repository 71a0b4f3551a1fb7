"""``python -m rt_mindeye.transport.keys KEYS_DIR [SERVICE ...]``: write the services' CURVE key pairs.

One pair per service (default: scanner, decoder, console, stimulus) and every public key in
``KEYS_DIR/authorized_clients`` (see :func:`rt_mindeye.transport.security.generate_service_keys`).
"""

from __future__ import annotations

import argparse

from rt_mindeye.process import cli_path
from rt_mindeye.transport.security import SERVICES, generate_service_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=cli_path)
    parser.add_argument("services", nargs="*", default=list(SERVICES))
    args = parser.parse_args(argv)
    generate_service_keys(args.directory, tuple(args.services))
    print(f"wrote CURVE keys for {', '.join(args.services)} to {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
