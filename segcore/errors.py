"""How an error becomes the one line segflow prints: the rule every layer shares."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """`exc`'s message with its white space (new lines included) collapsed, or its type's name
    when it has none; cut to `limit` characters with "..." when given.

    Example: one_line(ValueError("a.tif:\\n  not a TIFF")) -> "a.tif: not a TIFF".
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if limit is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return text
