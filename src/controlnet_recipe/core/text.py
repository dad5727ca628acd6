"""Text files of unknown encoding (side caption files, metadata), decoded without ever raising."""

from __future__ import annotations

import codecs
import unicodedata
from dataclasses import dataclass

# Checked before UTF-8: a BOM names its encoding (UTF-32's before UTF-16's, which it starts with).
BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
LEGACY = ("cp1252", "latin-1")  # 8-bit fallbacks, in order: Windows' Western encoding, then ISO 8859-1
UNDECODABLE = "undecodable"  # bytes in no encoding tried
UNREADABLE = "unreadable"  # a file that cannot be opened (a broken link, no permission)


@dataclass(frozen=True)
class Text:
    text: str | None  # None when undecodable
    encoding: str | None  # None for plain UTF-8; else what was used, or UNDECODABLE


def _plausible(text: str) -> bool:
    """Text, not bytes that happened to decode: no control characters but whitespace, and mostly ASCII."""
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text):
        return False
    return not text or sum(ch.isascii() for ch in text) / len(text) >= 0.5


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 without a BOM shows as a NUL in every other byte of ASCII text."""
    if len(data) < 2 or len(data) % 2:
        return None
    for enc, zeros in (("utf-16-le", data[1::2]), ("utf-16-be", data[0::2])):
        if zeros.count(0) >= 0.5 * len(zeros):
            return enc
    return None


def decode_text(data: bytes) -> Text:
    """UTF-8 first; then a BOM's encoding, UTF-16 without a BOM, cp1252 and latin-1, each kept only
    if the result reads as text. Random bytes come back as ``Text(None, UNDECODABLE)``."""
    for bom, enc in BOMS:
        if data.startswith(bom):
            try:
                return Text(data.decode(enc), None if enc == "utf-8-sig" else enc)
            except UnicodeDecodeError:
                break
    try:
        text = data.decode("utf-8")
        if _plausible(text):
            return Text(text, None)
    except UnicodeDecodeError:
        pass
    utf16 = _utf16_without_bom(data)
    for enc in ((utf16,) if utf16 else ()) + LEGACY:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if _plausible(text):
            return Text(text, enc)
    return Text(None, UNDECODABLE)
