"""Whether a value is a text winnow can train on: the checks that validate applies to every record and that the select
stage applies to its target examples, in one module below both."""

from __future__ import annotations

import re
from typing import Any

CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")  # C0 and DEL; tab, newlines, \v and \f are text


# ANSI / VT100 escape sequences: CSI (ESC [ parameters, final byte: colours such as ESC[31m, cursor moves), OSC
# (ESC ] ... ended by BEL or ESC \\, e.g. terminal titles and hyperlinks) and the other ESC sequences (ESC, any
# intermediate bytes, a final byte: ESC ( B, ESC 7, ESC M)
ESCAPE_SEQUENCES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]")


def strip_controls(text: str) -> tuple[str, int, int]:
    """(text without ANSI/VT100 escape sequences, then without any C0 control or DEL left; escape sequences
    removed; other control characters removed)."""
    text, escapes = ESCAPE_SEQUENCES.subn("", text)
    text, controls = CONTROL_CHARACTERS.subn("", text)
    return text, escapes, controls


def check_text(value: Any, max_bytes: int, control_characters: str = "reject"
               ) -> tuple[str | None, tuple[str, str] | None]:
    """(text, None) for a usable text, else (None, (reason, detail))."""
    if value is None:
        return None, ("null_text", "text is null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            return None, ("invalid_utf8", f"undecodable byte at offset {error.start}")
    if not isinstance(value, str):
        return None, ("non_string_text", f"text is a {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        return None, ("invalid_utf8", f"unpaired surrogate at character {error.start}")
    if not value.strip():
        return None, ("empty_text", "text is empty or whitespace")
    if size > max_bytes:
        return None, ("text_too_long", f"{size} bytes > validate.max_text_bytes={max_bytes}")
    if control_characters == "reject":
        found = CONTROL_CHARACTERS.search(value)
        if found is not None:
            return None, ("control_characters", f"U+{ord(found.group()):04X} at character {found.start()}")
    return value, None
