"""A small, exact walker for the bytes of a DICOM sequence: the per-frame functional groups without pydicom's cost.

An Enhanced MR volume of 70 slices carries ~70 per-frame items of 4-6 nested sequences each. pydicom builds a full
``Dataset`` (with per-attribute bookkeeping) for every nested item on first access, which costs tens of milliseconds
per volume, more than reading and sorting the pixels. The multi-frame reader only needs a handful of values per
frame, so it walks the raw bytes of ``PerFrameFunctionalGroupsSequence`` / ``SharedFunctionalGroupsSequence`` here
and decodes values on demand.

:func:`parse_sequence` handles explicit VR little endian (what every scanner writes for Enhanced MR), nested
sequences and items of defined or undefined length, and private sequences stored as ``UN`` of undefined length
(implicit VR inside, per PS3.5 6.2.2). Anything else raises :class:`RawSequenceError`, and the caller falls back to
pydicom. :class:`RawItem` mimics the part of ``pydicom.Dataset`` the readers use: ``item.get(keyword)`` returns the
decoded value, ``item.get((group, element))`` an object with ``.value``.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_MAX_DEPTH = 16


class RawSequenceError(Exception):
    """The bytes are not a sequence this walker handles; use pydicom instead."""


class RawElement:
    """A tag's VR and value: raw bytes, or a list of :class:`RawItem` for a sequence."""

    __slots__ = ("tag", "vr", "raw")

    def __init__(self, tag: int, vr: str, raw):
        self.tag, self.vr, self.raw = tag, vr, raw

    @property
    def value(self) -> Any:
        return decode(self.vr, self.raw)


class RawItem:
    """One sequence item: ``{tag: RawElement}`` with a ``pydicom.Dataset``-like ``get``."""

    __slots__ = ("elements",)

    def __init__(self, elements: dict[int, RawElement]):
        self.elements = elements

    def get(self, key, default=None):
        if isinstance(key, str):
            tag = _keyword_tag(key)
            element = self.elements.get(tag) if tag is not None else None
            return default if element is None else element.value
        if isinstance(key, tuple):
            key = (key[0] << 16) | key[1]
        return self.elements.get(int(key), default)

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self.elements)


_KEYWORD_TAGS: dict[str, int | None] = {}


def _keyword_tag(keyword: str) -> int | None:
    if keyword not in _KEYWORD_TAGS:
        _KEYWORD_TAGS[keyword] = tag_for_keyword(keyword)
    return _KEYWORD_TAGS[keyword]


def decode(vr: str, raw) -> Any:
    """A value as pydicom would present it: numbers for DS/IS/binary VRs, str for text, list for several values."""
    if vr == "SQ":
        return raw
    if vr in _BINARY:
        code = _BINARY[vr]
        count = len(raw) // struct.calcsize(code)
        values = struct.unpack(f"<{count}{code}", raw[: count * struct.calcsize(code)])
        return values[0] if count == 1 else MultiValue(type(values[0]) if values else int, values)
    if vr in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return raw
    text = raw.decode("latin-1").rstrip("\0 ").lstrip(" ")
    if vr in ("DS", "IS"):
        parts = [part.strip() for part in text.split("\\")]
        convert = float if vr == "DS" else int
        try:
            values = [convert(part) for part in parts if part]
        except ValueError:
            return text  # let the caller report the malformed value with its field name
        if not values:
            return ""
        return values[0] if len(values) == 1 else MultiValue(convert, values)
    if "\\" in text and vr not in ("LT", "ST", "UT"):
        return MultiValue(str, text.split("\\"))
    return text


def parse_sequence(buffer: bytes, *, explicit: bool = True) -> list[RawItem]:
    """Items of a defined-length sequence value (``buffer`` = exactly the SQ's value bytes)."""
    items, _ = _items(memoryview(buffer), 0, len(buffer), explicit, 0, delimited=False)
    return items


def parse_delimited_sequence(view: memoryview, position: int, explicit: bool = True) -> tuple[list[RawItem], int]:
    """Items of an undefined-length sequence whose value starts at ``position``; returns (items, end position)."""
    return _items(view, position, len(view), explicit, 0, delimited=True)


def _items(
    view: memoryview, position: int, end: int, explicit: bool, depth: int, delimited: bool
) -> tuple[list[RawItem], int]:
    if depth > _MAX_DEPTH:
        raise RawSequenceError("sequences nested too deep")
    items: list[RawItem] = []
    while position + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", view, position)
        tag = (group << 16) | element
        position += 8
        if tag == _SEQUENCE_END:
            return items, position
        if tag != _ITEM:
            raise RawSequenceError(f"expected an item tag, found ({group:04X},{element:04X})")
        if length == _UNDEFINED:
            elements, position = _elements(view, position, end, explicit, depth, until_item_end=True)
        else:
            if position + length > end:
                raise RawSequenceError("item runs past the sequence")
            elements, _ = _elements(view, position, position + length, explicit, depth, until_item_end=False)
            position += length
        items.append(RawItem(elements))
    if delimited:
        raise RawSequenceError("sequence of undefined length has no end delimiter")
    if position != end:
        raise RawSequenceError("sequence ends inside an item header")
    return items, position


def _elements(
    view: memoryview, position: int, end: int, explicit: bool, depth: int, until_item_end: bool
) -> tuple[dict[int, RawElement], int]:
    elements: dict[int, RawElement] = {}
    while position + 8 <= end:
        group, element = struct.unpack_from("<HH", view, position)
        tag = (group << 16) | element
        if tag == _ITEM_END:
            return elements, position + 8
        if explicit:
            vr_bytes = bytes(view[position + 4 : position + 6])
            if vr_bytes in _LONG_VRS:
                if position + 12 > end:
                    raise RawSequenceError("element header runs past the item")
                (length,) = struct.unpack_from("<I", view, position + 8)
                position += 12
            else:
                if not vr_bytes.isalpha() or not vr_bytes.isupper():
                    raise RawSequenceError(f"not explicit VR at ({group:04X},{element:04X})")
                (length,) = struct.unpack_from("<H", view, position + 6)
                position += 8
            vr = vr_bytes.decode("ascii")
        else:
            (length,) = struct.unpack_from("<I", view, position + 4)
            position += 8
            vr = "SQ" if length == _UNDEFINED else _implicit_vr(tag)
        if length == _UNDEFINED:
            if vr not in ("SQ", "UN"):
                raise RawSequenceError(f"undefined length for VR {vr}")
            # An undefined-length UN is a sequence encoded implicit VR little endian (PS3.5 6.2.2).
            inner_explicit = explicit and vr == "SQ"
            items, position = _items(view, position, end, inner_explicit, depth + 1, delimited=True)
            elements[tag] = RawElement(tag, "SQ", items)
            continue
        if position + length > end:
            raise RawSequenceError(f"value of ({group:04X},{element:04X}) runs past its item")
        value = view[position : position + length]
        position += length
        if vr == "SQ":
            items, _ = _items(value, 0, length, explicit, depth + 1, delimited=False)
            elements[tag] = RawElement(tag, "SQ", items)
        else:
            elements[tag] = RawElement(tag, vr, bytes(value))
    if until_item_end:
        raise RawSequenceError("item of undefined length has no end delimiter")
    return elements, position


def _implicit_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"
