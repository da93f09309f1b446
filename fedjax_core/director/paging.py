"""List answers in pages, so that no number of rows and no single row makes an answer too large to send.

A page ends after ``page_size`` rows or before ``MAX_PAGE_BYTES``, whichever comes first (one row
is always sent: a row is bounded well below gRPC's 8 MiB message limit where it arrives). The
answer's ``next_page_token`` names the last row sent; "" means there is nothing more.
"""
from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message

from fedjax_core.errors import InvalidRequestError

DEFAULT_PAGE_ROWS = 100
MAX_PAGE_ROWS = 1000
MAX_PAGE_BYTES = 4 << 20
MAX_TOKEN_CHARS = 256


def page_size(requested: int) -> int:
    """The rows a page may hold: ``requested``, or the default for 0."""
    if requested == 0:
        return DEFAULT_PAGE_ROWS
    if not 1 <= requested <= MAX_PAGE_ROWS:
        raise InvalidRequestError(f"page_size is {requested}; ask for 1 to {MAX_PAGE_ROWS} rows, or 0 for "
                                  f"the default ({DEFAULT_PAGE_ROWS})")
    return requested


def sequence_token(token: str) -> int:
    """The row number a ``next_page_token`` of a list ordered by number names (0 for the first page)."""
    if token == "":
        return 0
    if len(token) > 20 or not token.isdigit():
        raise InvalidRequestError(f"page_token {token[:40]!r} is not one this director gave: pass the previous "
                                  "answer's next_page_token, or '' for the first page")
    return int(token)


def name_token(token: str) -> str:
    """The name a ``next_page_token`` of a list ordered by name names ('' for the first page)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidRequestError(f"page_token is {len(token)} characters; a token this director gives has at "
                                  f"most {MAX_TOKEN_CHARS}: pass the previous answer's next_page_token")
    return token


def fill(rows: Iterable[tuple[str, Message]], limit: int) -> tuple[list[Message], str]:
    """Up to ``limit`` of ``rows`` (key, message) that fit ``MAX_PAGE_BYTES``, and the token of the next
    page ("" when ``rows`` had no more). Pass one row more than ``limit`` to tell a last page apart."""
    page: list[Message] = []
    size = 0
    last_key = ""
    for key, message in rows:
        size += message.ByteSize() + 8  # the field's tag and length
        if len(page) == limit or (page and size > MAX_PAGE_BYTES):
            return page, last_key
        page.append(message)
        last_key = key
    return page, ""
