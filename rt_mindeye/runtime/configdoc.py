"""Generate ``docs/configuration.md`` from the session configuration's dataclasses (the single source of truth).

``python -m rt_mindeye.runtime.configdoc > docs/configuration.md``; a test fails when the file is out of date.
"""

from __future__ import annotations

import dataclasses
import typing

from rt_mindeye.config import describe
from rt_mindeye.runtime.config import SessionConfig

HEADER = """# Configuration reference

One YAML file configures a session; every service reads it and takes only its own sections, so the scanner host, the
decoder (GPU host) and the console can run on three machines with the same file. Every key is validated when the file
is loaded: an unknown key, a wrong type or an out-of-range value stops the service with the file name and the dotted
key, e.g. `configs/site.yaml: watcher.gap_timeout_tr: must be >= 0.5, got 0.1`. Relative paths are relative to the
folder of the YAML file (paths typed on a command line are relative to the working directory). Missing keys take the
defaults below. Examples: `configs/`.

This page is generated from the code (`python -m rt_mindeye.runtime.configdoc > docs/configuration.md`).
"""


def render() -> str:
    lines = [HEADER]
    hints = typing.get_type_hints(SessionConfig)
    for f in dataclasses.fields(SessionConfig):
        section = hints[f.name]
        lines.append(f"## `{f.name}`: {f.metadata.get('doc', '')}\n")
        lines.append("| key | type | default | meaning |")
        lines.append("| --- | --- | --- | --- |")
        for key, tp, default, doc in describe(section, f.name):
            shown = "null" if default is None else default
            lines.append(f"| `{key}` | {tp} | `{shown}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
