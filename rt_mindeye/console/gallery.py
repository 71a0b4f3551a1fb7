"""A static, browsable HTML gallery of the session, rewritten atomically as trials arrive.

``gallery_dir/index.html`` lists every trial (newest first): the image the subject saw (when ``stim_file`` resolves
to a file), the top-5 retrieved images with labels and scores, and the reconstruction thumbnail. Thumbnails are
written to ``gallery_dir/thumbs/`` from the PNG bytes a :class:`DecodeResult` carries or from the reconstruction
file when it is reachable from this host. The page reloads itself every few seconds, so an open browser follows the
session. Writes go to a temporary file and ``os.replace``, so a browser never reads half a page.
"""

from __future__ import annotations

import html
import io
import logging
import os
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from rt_mindeye.console.state import ConsoleState, TrialRow
from rt_mindeye.transport.messages import DecodeResult

__all__ = ["Gallery"]

log = logging.getLogger(__name__)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Gallery:
    """Writes thumbnails and ``index.html`` under ``root``."""

    def __init__(self, root: str | Path, *, stimulus_dir: str | Path | None = None, thumbnail_px: int = 160,
                 refresh_s: float = 5.0, title: str = "rt-mindeye session"):
        self.root = Path(root)
        self.stimulus_dir = Path(stimulus_dir) if stimulus_dir is not None else None
        self.thumbnail_px = thumbnail_px
        self.refresh_s = refresh_s
        self.title = title
        self.thumbs = self.root / "thumbs"

    @property
    def index_path(self) -> Path:
        return self.root / "index.html"

    def write_thumbnail(self, result: DecodeResult) -> str | None:
        """Write the reconstruction thumbnail of ``result``; returns its path, or None when there is no image."""
        source: io.BytesIO | Path | None = None
        if result.thumbnail_png is not None and result.thumbnail_png.size:
            source = io.BytesIO(result.thumbnail_png.tobytes())
        elif result.reconstruction_path and Path(result.reconstruction_path).is_file():
            source = Path(result.reconstruction_path)
        if source is None:
            return None
        try:
            with Image.open(source) as image:
                image = image.convert("RGB")
                image.thumbnail((self.thumbnail_px, self.thumbnail_px))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
        except (UnidentifiedImageError, OSError) as exc:
            log.warning("gallery: cannot read reconstruction of run %d trial %d: %s", result.run, result.trial, exc)
            return None
        path = self.thumbs / f"run{result.run:02d}_trial{result.trial:04d}_recon.png"
        _atomic_write(path, buffer.getvalue())
        return str(path)

    def _href(self, path: str | None) -> str | None:
        """A link from index.html to ``path`` (relative when possible), or None when the file is not here."""
        if not path:
            return None
        candidate = Path(path)
        if not candidate.is_absolute() and self.stimulus_dir is not None:
            candidate = self.stimulus_dir / candidate
        if not candidate.is_file():
            return None
        try:
            return os.path.relpath(candidate.resolve(), self.root.resolve()).replace(os.sep, "/")
        except ValueError:  # another drive on Windows
            return candidate.resolve().as_uri()

    def _image(self, path: str | None, alt: str, css: str) -> str:
        href = self._href(path)
        if href is None:
            return f'<div class="{css} missing">{html.escape(alt or "-")}</div>'
        return f'<img class="{css}" src="{html.escape(href)}" alt="{html.escape(alt)}" loading="lazy">'

    def _row(self, row: TrialRow) -> str:
        seen = self._image(row.stim_file, row.stim_file or "not known", "seen")
        retrieved = "".join(
            f'<figure>{self._image(r.image, r.label or str(r.id), "top")}'
            f'<figcaption>{html.escape(r.label or str(r.id))}<br>{r.score:.3f}</figcaption></figure>'
            for r in row.topk[:5]) or '<div class="missing">no retrieval yet</div>'
        recon = (self._image(row.thumbnail_path or row.reconstruction_path, "reconstruction", "recon")
                 if (row.thumbnail_path or row.reconstruction_path)
                 else f'<div class="recon missing">{html.escape(row.policy_decision or "pending")}</div>')
        latency = ""
        if row.retrieval_latency_s is not None:
            latency += f"retrieval {row.retrieval_latency_s:.2f} s"
        if row.reconstruction_latency_s is not None:
            latency += f"<br>reconstruction {row.reconstruction_latency_s:.2f} s"
        return (f'<tr id="r{row.run}t{row.trial}"><td class="id">run {row.run}<br>trial {row.trial}<br>'
                f'<span class="dim">{html.escape(row.trial_type)} {html.escape(row.estimate_kind)}</span><br>'
                f'<span class="dim">{latency}</span></td>'
                f"<td>{seen}</td><td class=\"topk\">{retrieved}</td><td>{recon}</td></tr>")

    def render_html(self, state: ConsoleState) -> str:
        rows = "\n".join(self._row(row) for row in reversed(state.trials))
        title = html.escape(f"{self.title} {state.session}".strip())
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{self.refresh_s:g}">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; background: #111; color: #ddd; margin: 1em; }}
table {{ border-collapse: collapse; }} td {{ border-bottom: 1px solid #333; padding: 6px; vertical-align: top; }}
img {{ max-width: {self.thumbnail_px}px; max-height: {self.thumbnail_px}px; }}
img.top {{ max-width: {self.thumbnail_px // 2}px; max-height: {self.thumbnail_px // 2}px; }}
figure {{ display: inline-block; margin: 0 4px; text-align: center; font-size: 0.8em; }}
.missing {{ color: #777; font-style: italic; min-width: 80px; }} .dim {{ color: #888; font-size: 0.85em; }}
</style></head><body>
<h1>{title}</h1>
<p class="dim">{len(state.trials)} trials, {state.volumes_total} volumes, reconstruction policy
{html.escape(state.recon_policy or "-")}; this page reloads every {self.refresh_s:g} s.</p>
<table><thead><tr><th>trial</th><th>seen</th><th>top-5 retrieved</th><th>reconstruction</th></tr></thead>
<tbody>
{rows}
</tbody></table></body></html>
"""

    def update(self, state: ConsoleState) -> Path:
        """Rewrite ``index.html`` from ``state`` atomically; returns its path."""
        _atomic_write(self.index_path, self.render_html(state).encode("utf-8"))
        return self.index_path
