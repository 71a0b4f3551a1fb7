"""Siemens CSA header reader: bytes in, a small read-only mapping out.

Siemens stores acquisition details that standard DICOM has no place for in two private elements of the
``SIEMENS CSA HEADER`` block, ``(0029,xx10)`` (image) and ``(0029,xx20)`` (series). Each is a little-endian list of
named tags, each tag a list of text items. Two layouts exist:

* **CSA2** (VB13 and later, and every VD/VE scanner): starts with ``b"SV10"`` and four unused bytes;
* **CSA1** (older VA/VB software): no magic; starts directly with the tag count.

After that both read the same way: ``uint32 n_tags``, ``uint32 unused`` (77), then per tag a 64-byte NUL-terminated
name, ``int32 vm``, a 4-byte VR, ``int32 syngodt``, ``int32 n_items``, ``int32 unused`` (77 or 205), then per item
four ``int32`` (x0..x3) and the item text padded to a 4-byte boundary. The text length is ``x1`` in CSA2; in CSA1 it
is ``x0`` minus the item count of the first tag (an oddity of the format documented by SPM's ``spm_dicom_headers``).
Only the first ``vm`` items carry values (all of them when ``vm == 0``); an empty item ends the values.

This module only walks bytes. :func:`csa_bytes` finds the element in a pydicom dataset; :mod:`.dicom` adds geometry.
An absent header gives ``None``; a malformed one raises :class:`CsaReadError`, never a ``struct.error`` or an endless
loop: tag and item counts are bounded by :data:`MAX_CSA_TAGS` / :data:`MAX_CSA_ITEMS` and every length is checked
against the bytes that are there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from rt_mindeye.errors import DicomReadError

MAX_CSA_TAGS = 1000
"""More tags than this means the bytes are not a CSA header (real ones have ~100 image / ~80 series tags)."""
MAX_CSA_ITEMS = 1000
"""More items per tag than this means corruption (real tags have at most a few hundred, e.g. per-slice times)."""

CSA_PRIVATE_CREATOR = "SIEMENS CSA HEADER"
_ELEMENT_OFFSET = {"image": 0x10, "series": 0x20}

_TAG_HEADER = struct.Struct("<64si4s3i")  # name, vm, vr, syngodt, n_items, unused
_ITEM_HEADER = struct.Struct("<4i")

_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US"})
_FLOAT_VRS = frozenset({"DS", "FD", "FL"})


class CsaReadError(DicomReadError):
    """A CSA header is present but its bytes are malformed; names the file (if known) and the CSA tag."""


@dataclass(frozen=True)
class CsaTag:
    """One CSA tag: its declared multiplicity and VR, and its values converted by VR (int, float or str)."""

    name: str
    vm: int
    vr: str
    syngodt: int
    values: tuple


class CsaHeader(Mapping[str, CsaTag]):
    """A parsed CSA header: ``header["NumberOfImagesInMosaic"].values`` or the getters below.

    ``format`` is 1 (old layout) or 2 (``SV10``). Getters return ``None`` when a tag is missing or has no values.
    """

    def __init__(self, format: int, raw_tags: Mapping[str, tuple], source: str):
        self.format = format
        self._raw = dict(raw_tags)  # name -> (vm, vr, syngodt, [item bytes]); decoded on first access
        self._tags: dict[str, CsaTag] = {}
        self.source = source

    def __getitem__(self, name: str) -> CsaTag:
        tag = self._tags.get(name)
        if tag is None:
            vm, vr, syngodt, items = self._raw[name]
            tag = self._tags[name] = CsaTag(name, vm, vr, syngodt, _decode_items(items, vr, self.source, name))
        return tag

    def get(self, name: str, default=None):
        return self[name] if name in self._raw else default

    def __contains__(self, name) -> bool:
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"CsaHeader(format={self.format}, {len(self)} tags, source={self.source!r})"

    def scalar(self, name: str) -> Any:
        """The first value of tag ``name``, or ``None``."""
        tag = self.get(name)
        if tag is None or not tag.values:
            return None
        return tag.values[0]

    def vector(self, name: str, length: int | None = None) -> np.ndarray | None:
        """The values of numeric tag ``name`` as float64, or ``None``; with ``length``, the first ``length`` values.

        Raises :class:`CsaReadError` when fewer than ``length`` values are present or a value is not numeric.
        """
        tag = self.get(name)
        if tag is None or not tag.values:
            return None
        values = tag.values if length is None else tag.values[:length]
        if length is not None and len(values) < length:
            raise CsaReadError(self.source, f"CSA tag has {len(tag.values)} values, expected {length}", name)
        try:
            return np.array(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise CsaReadError(self.source, f"CSA tag is not numeric: {values[:4]!r}", name) from None


def _text(raw: bytes) -> str:
    """Item text up to the first NUL, decoded permissively (Siemens writes Latin-1)."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("latin-1")


def _decode_items(items: list, vr: str, source: str, name: str) -> tuple:
    values = []
    for item in items:
        text = _text(item)
        if not text.strip():
            break  # an empty item ends the values (numeric tags always; string tags pad this way)
        values.append(_convert(text, vr, source, name))
    return tuple(values)


def _convert(text: str, vr: str, source: str, name: str) -> Any:
    try:
        if vr in _INT_VRS:
            return int(text.strip())
        if vr in _FLOAT_VRS:
            return float(text.strip())
    except ValueError:
        raise CsaReadError(source, f"CSA item {text[:32]!r} is not a valid {vr}", name) from None
    return text


def parse_csa(raw: bytes, source: str | Path | None = None) -> CsaHeader:
    """Parse the bytes of one CSA header (either layout). ``source`` only names the file in errors.

    Raises :class:`CsaReadError` for truncated or inconsistent bytes or counts beyond the bounds. Item values are
    decoded when a tag is first looked up; a value that does not fit its VR raises :class:`CsaReadError` then.
    """
    where = str(source) if source is not None else "<CSA header>"
    raw = bytes(raw)
    size = len(raw)
    if raw[:4] == b"SV10":
        layout, pos = 2, 8
    else:
        layout, pos = 1, 0
    if size < pos + 8:
        raise CsaReadError(where, f"CSA header of {size} bytes is too short")
    n_tags, _unused = struct.unpack_from("<2I", raw, pos)
    pos += 8
    if not 0 < n_tags <= MAX_CSA_TAGS:
        raise CsaReadError(where, f"CSA header declares {n_tags} tags (expected 1..{MAX_CSA_TAGS})")
    tags: dict[str, tuple] = {}
    first_tag_items = 0
    for tag_no in range(n_tags):
        if pos + _TAG_HEADER.size > size:
            raise CsaReadError(where, f"CSA header ends inside tag {tag_no} of {n_tags}")
        raw_name, vm, raw_vr, syngodt, n_items, _unused = _TAG_HEADER.unpack_from(raw, pos)
        pos += _TAG_HEADER.size
        name = _text(raw_name)
        vr = _text(raw_vr).strip()
        if tag_no == 0:
            first_tag_items = n_items
        if not 0 <= n_items <= MAX_CSA_ITEMS:
            raise CsaReadError(where, f"CSA tag declares {n_items} items (expected 0..{MAX_CSA_ITEMS})", name)
        if vm < 0:
            raise CsaReadError(where, f"CSA tag has negative multiplicity {vm}", name)
        n_values = vm if vm else n_items
        items = []
        for item_no in range(n_items):
            if pos + _ITEM_HEADER.size > size:
                raise CsaReadError(where, f"CSA header ends inside item {item_no} of tag", name)
            x0, x1, _x2, _x3 = _ITEM_HEADER.unpack_from(raw, pos)
            pos += _ITEM_HEADER.size
            item_len = x1 if layout == 2 else x0 - first_tag_items
            if layout == 1 and (item_len < 0 or pos + item_len > size):
                # The old layout has no reliable way to tell a missing item from padding: the tag ends here.
                break
            if item_len < 0 or pos + item_len > size:
                raise CsaReadError(where, f"CSA item {item_no} claims {item_len} bytes, past the header end", name)
            if item_no < n_values:
                items.append(raw[pos : pos + item_len])
            pos += item_len + (-item_len) % 4
        tags[name] = (vm, vr, syngodt, items)
    return CsaHeader(layout, tags, where)


def private_element(dataset, group: int, creator: str, element_offset: int):
    """The private element ``(group, xx<offset>)`` of the block reserved by ``creator``, or ``None``.

    The block is located through its creator (``(group, 00xx) == creator``), not assumed to be at ``xx = 0x10``:
    anonymisers and converters move private blocks.
    """
    for block in range(0x10, 0x100):
        reservation = dataset.get((group, block))
        if reservation is None:
            continue
        value = reservation.value
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if str(value).strip() == creator:
            return dataset.get((group, (block << 8) | element_offset))
    return None


def csa_bytes(dataset, kind: str = "image") -> bytes | None:
    """The raw CSA ``kind`` ("image" or "series") header of a pydicom dataset, or ``None`` if it has none."""
    try:
        offset = _ELEMENT_OFFSET[kind]
    except KeyError:
        raise ValueError(f"CSA header kind must be 'image' or 'series', not {kind!r}") from None
    element = private_element(dataset, 0x0029, CSA_PRIVATE_CREATOR, offset)
    if element is None or element.value is None:
        return None
    return bytes(element.value)


def read_csa(dataset, kind: str = "image", source: str | Path | None = None) -> CsaHeader | None:
    """Parse the CSA ``kind`` header of a pydicom dataset; ``None`` if absent, :class:`CsaReadError` if malformed."""
    raw = csa_bytes(dataset, kind)
    if raw is None or len(raw) == 0:
        return None
    return parse_csa(raw, source)
