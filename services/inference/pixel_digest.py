"""The scene cache's exact key: a digest of what decides a frame's decoded pixels, not of every byte.

Cameras stamp metadata into every frame (an EXIF DateTime, a COM comment, an APPn counter, a PNG tEXt
or tIME), so frames with the same pixels can differ in their bytes. The digest leaves out the
segments and chunks that the decoder (OpenCV, libjpeg-turbo, libpng) never turns into pixels:

- JPEG, up to the first SOS: COM, and APPn except APP0 and APP14, which libjpeg reads to choose the
  colour transform (JFIF, Adobe), and APP1. Of an APP1 "Exif" segment its structure counts: its
  length, TIFF header and IFD0's entries, where the orientation that OpenCV's imdecode turns the
  picture by is stored inline; not the values the entries point to (a DateTime, strings, rationals).
  OpenCV's EXIF reader reads those too, and gives up on the whole EXIF (no turn) when an entry points
  past the segment, but that depends on the digested entries and length alone. Any other APP1 (XMP,
  or an Exif one whose IFD0 runs past the segment) is digested whole. Every other segment (DQT, DHT,
  SOF, DRI, ...) and every byte from the first SOS to the end (scans, later tables, EOI, any trailer)
  is digested.
- PNG: tEXt, zTXt and iTXt (except ImageMagick's "Raw profile type ..." ones, which carry EXIF a decoder
  may apply: OpenCV 5.1 does not, but keeping them costs nothing), tIME and pHYs. A deny-list, not an
  allow-list, so that a chunk not named here counts (fails closed): eXIf in particular, whose
  orientation OpenCV applies to a PNG too (measured: an eXIf chunk with orientation 6 turns a 300x451
  decode into 451x300). A PNG whose IDAT chunks another chunk splits (libpng then fails: "Not enough
  image data") is digested whole. Their CRCs are not checked: libpng only warns of a bad one in an
  ancillary chunk, and decodes the same pixels.

Anything else, or anything that does not parse (a truncated segment, a stray byte where a marker
belongs, more than MAX_STEPS segments or chunks), is digested whole: byte-identical frames still
match, and a frame the walk cannot read is never matched by its pixels. The three schemes (JPEG, PNG,
whole bytes) use distinct BLAKE2b personalisations, so one scheme's input can never collide with
another's. The walk reads lengths only to step within the bytes, bounded by their end and by
MAX_STEPS; hashlib is fed memoryview slices, so no payload is copied.
"""

from __future__ import annotations

import hashlib
import struct

# BLAKE2b: faster than MD5 in CPython's hashlib (0.078 against 0.099 ms for the bundled photos), and
# 128 bits make a collision between two frames of a device out of the question.
DIGEST_SIZE = 16
# Segments (JPEG, before the first scan; fill bytes count) or chunks (PNG) walked at most; past that
# the frame is digested whole. The bundled photos have 9 JPEG segments before the scan, and a PNG of
# the largest frame intake admits (4 MiB) has about 512 IDAT chunks of libpng's 8 KiB. A hostile
# frame's walk stops there: 0.6 ms for a PNG of 5000 empty chunks, 0.3 ms for a JPEG of 5000 empty
# COM segments (measured as the cost figures in cache.py).
MAX_STEPS = 1024

_SOI, _SOS, _COM = 0xD8, 0xDA, 0xFE
_APP0, _APP1, _APP14, _APP15 = 0xE0, 0xE1, 0xEE, 0xEF
# Markers without a length: SOI, EOI, RST0-7, TEM; before the first scan they mean a malformed file.
_PARAMLESS = {0x01, 0xD8, 0xD9, *range(0xD0, 0xD8)}
_EXIF = b"Exif\x00\x00"
# Stands for an APP1 Exif segment in the digest (then its length, header and IFD0): a length of 0,
# which no segment digested as it is has.
_EXIF_STAND_IN = b"\xff\xe1\x00\x00"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
_PNG_METADATA = {*_PNG_TEXT, b"tIME", b"pHYs"}
_RAW_PROFILE = b"Raw profile type"
_BEFORE, _IN, _AFTER = 0, 1, 2  # where the walk is in relation to the IDAT chunks


def pixel_digest(data: bytes) -> bytes:
    """A 16-byte BLAKE2b digest of what decides `data`'s decoded pixels (see the module docstring).

    Args:
        data: a frame's image bytes (JPEG, PNG, or anything: then all of them are digested).

    Returns:
        The digest: equal for byte-identical frames, and for JPEGs or PNGs that differ only in the
        metadata left out (tests/unit/test_scene_cache.py checks that those decode to the same pixels
        with the OpenCV installed). Never raises for malformed input.
    """
    if data.startswith(b"\xff\xd8"):
        digest = _jpeg(data)
    elif data.startswith(_PNG_MAGIC):
        digest = _png(data)
    else:
        digest = None
    return digest if digest is not None else hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=b"bytes").digest()


def _jpeg(data: bytes) -> bytes | None:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"jpeg")
    view, end = memoryview(data), len(data)
    run, i = 0, 2  # run: where the bytes not yet fed, all digested, begin
    for _ in range(MAX_STEPS):
        if i + 4 > end or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before a marker: decodes the same with or without
            h.update(view[run:i])
            run = i = i + 1
            continue
        if marker == _SOS:
            h.update(view[run:])
            return h.digest()
        if marker in _PARAMLESS or marker == 0x00:
            return None
        stop = i + 2 + ((data[i + 2] << 8) | data[i + 3])
        if stop < i + 4 or stop > end:
            return None
        if marker == _COM or (_APP0 < marker <= _APP15 and marker not in (_APP1, _APP14)):
            h.update(view[run:i])
            run = stop
        elif marker == _APP1 and (exif := _exif_ifd0(data, i + 4, stop)) is not None:
            tiff, ifd, ifd_end = exif
            h.update(view[run:i])
            h.update(_EXIF_STAND_IN)
            h.update(view[i + 2:tiff + 8])  # its length, "Exif\0\0" and TIFF header
            h.update(view[ifd:ifd_end])
            run = stop
        i = stop
    return None


def _exif_ifd0(data: bytes, start: int, stop: int) -> tuple[int, int, int] | None:
    """Where an APP1 payload (data[start:stop]) that is Exif has its TIFF header and IFD0's count and
    entries: (header, ifd0, end of its entries); None where it is not Exif or IFD0 runs past the
    segment (the caller then digests the segment whole: fail closed)."""
    tiff = start + len(_EXIF)
    if not data.startswith(_EXIF, start, stop) or tiff + 8 > stop:
        return None
    order = data[tiff:tiff + 2]
    if order not in (b"II", b"MM"):
        return None
    endian = "<" if order == b"II" else ">"
    (offset,) = struct.unpack_from(endian + "I", data, tiff + 4)
    ifd = tiff + offset
    if ifd + 2 > stop:
        return None
    (count,) = struct.unpack_from(endian + "H", data, ifd)
    end = ifd + 2 + 12 * count
    return (tiff, ifd, end) if end <= stop else None


def _png(data: bytes) -> bytes | None:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"png")
    view, end = memoryview(data), len(data)
    run, i = 0, len(_PNG_MAGIC)
    idat = _BEFORE
    for _ in range(MAX_STEPS):
        if i + 12 > end:
            return None
        (length,) = struct.unpack_from(">I", data, i)
        kind = data[i + 4:i + 8]
        stop = i + 12 + length  # length, type, data, CRC
        if length > 0x7FFFFFFF or stop > end:
            return None
        if kind == b"IDAT":
            if idat == _AFTER:  # another chunk split the image data: libpng refuses it, but would not
                return None  # without that chunk, so it must count: the PNG is digested whole
            idat = _IN
        elif idat == _IN:
            idat = _AFTER
        if kind in _PNG_METADATA and not (kind in _PNG_TEXT and data.startswith(_RAW_PROFILE, i + 8, stop)):
            h.update(view[run:i])
            run = stop
        i = stop
        if kind == b"IEND":
            h.update(view[run:])  # and whatever trails it
            return h.digest()
    return None
