"""The HTML gallery on disk, and the console runner following real publishers (headless and Live)."""

from __future__ import annotations

import io
import logging
import time
from html.parser import HTMLParser

from PIL import Image
from rich.console import Console as RichConsole

from rt_mindeye.console.config import ConsoleConfig
from rt_mindeye.console.gallery import Gallery
from rt_mindeye.console.runner import OperatorConsole
from rt_mindeye.console.state import ConsoleState, apply
from rt_mindeye.transport.pubsub import SnapshotPublisher, Source

LOOP = "tcp://127.0.0.1:0"


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_gallery_writes_thumbnails_and_an_index(tmp_path, factories):
    stimuli = tmp_path / "stimuli"
    stimuli.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(stimuli / "seen.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(stimuli / "cand11.png")
    gallery = Gallery(tmp_path / "gallery", stimulus_dir=stimuli, thumbnail_px=48)
    retrieval = factories.result(1, stim_file="seen.png",
                                 images=("cand11.png", "missing.png", "missing.png", "missing.png", "missing.png"))
    recon = factories.result(1, recon=True)
    state = apply(ConsoleState(), retrieval, now=1.0)
    assert gallery.write_thumbnail(retrieval) is None  # no image yet
    thumb = gallery.write_thumbnail(recon)
    with Image.open(thumb) as image:
        assert max(image.size) <= 48
    state = apply(state, recon, now=2.0, thumbnail_path=thumb)
    state = apply(state, factories.result(2, decision="skipped", labels=("a<b", "c", "d", "e", "f")), now=3.0)
    index = gallery.update(state)
    page = index.read_text()
    parser = _Images()
    parser.feed(page)
    assert sorted(parser.srcs) == sorted(["../stimuli/seen.png", "../stimuli/cand11.png",
                                          "thumbs/run01_trial0001_recon.png"])
    for src in parser.srcs:
        assert (index.parent / src).is_file()
    assert "a&lt;b" in page and "skipped" in page and "dog" in page
    assert page.index('id="r1t2"') < page.index('id="r1t1"')  # newest first
    assert [p.name for p in index.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_headless_console_follows_scanner_and_decoder(tmp_path, factories, caplog):
    hb = 0.05
    scanner = SnapshotPublisher(LOOP, LOOP, session="sub-01_ses-01", service="scanner", heartbeat_interval_s=hb)
    decoder = SnapshotPublisher(LOOP, LOOP, session="sub-01_ses-01", service="decoder", heartbeat_interval_s=hb)
    try:
        for v in (1, 2, 4):  # volume 3 never arrives
            scanner.publish(factories.volume(v))
        decoder.publish(factories.result(1))
        decoder.publish(factories.result(1, recon=True))
        config = ConsoleConfig(gallery_dir=tmp_path / "gallery", headless=True, refresh_per_second=20.0)
        console = OperatorConsole(config, [Source("scanner", scanner.pub_endpoint, scanner.snapshot_endpoint),
                                           Source("decoder", decoder.pub_endpoint, decoder.snapshot_endpoint)],
                                  heartbeat_interval_s=hb)
        with caplog.at_level(logging.INFO, logger="rt_mindeye.console"):
            state = console.run(duration_s=20.0, until=lambda s: (
                s.last_volume == 4 and s.trial(1, 1) is not None and s.trial(1, 1).thumbnail_path is not None
                and len(s.peers) == 2))
    finally:
        scanner.close()
        decoder.close()
    assert state.last_volume == 4 and state.volumes_in_run == 3 and state.gaps == ((1, 3),)
    row = state.trial(1, 1)
    assert row.topk[0].label == "dog" and row.thumbnail_path is not None
    assert {p.name for p in state.peers} == {"scanner", "decoder"}
    assert (tmp_path / "gallery" / "index.html").is_file()
    assert (tmp_path / "gallery" / "thumbs" / "run01_trial0001_recon.png").is_file()
    assert any("volume 4" in r.getMessage() for r in caplog.records)


def test_live_console_repaints_from_snapshots(factories):
    deliveries = []
    state = ConsoleState()
    from rt_mindeye.transport.pubsub import Delivery

    for v in range(1, 6):
        deliveries.append(Delivery("scanner", message=factories.volume(v)))
    deliveries.append(Delivery("decoder", message=factories.result(2, labels=("kite", "b", "c", "d", "e"))))

    def receive(timeout_s):
        if deliveries:
            return deliveries.pop(0)
        console.stop()  # everything was delivered: the run ends with a final repaint
        time.sleep(min(timeout_s, 0.01))
        return None

    screen = RichConsole(file=io.StringIO(), record=True, width=160, height=40, force_terminal=True)
    console = OperatorConsole(ConsoleConfig(refresh_per_second=20.0), receive=receive, rich_console=screen)
    state = console.run(duration_s=30.0, headless=False)
    assert state.last_volume == 5
    text = screen.export_text()
    assert "kite (0.91)" in text and "volume 5" in text
