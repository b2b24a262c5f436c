"""Keys never echo: every message, log line and stored error goes through `redact`, which removes
the values of the environment's keys and anything shaped like a bearer token or an API key (a
server may echo the Authorization header in an error body).
"""

from __future__ import annotations

import logging
import os
import re

REDACTED = "[redacted]"
# variables that hold secrets, by the end of their name (OPENAI_API_KEY, HF_TOKEN, ...)
SECRET_NAME = re.compile(r"(API_KEY|_KEY|_TOKEN|_SECRET|PASSWORD)$", re.IGNORECASE)
SHAPED = re.compile(r"\b(?:[Bb]earer|BEARER)\s+(?!\[redacted\])"     # an Authorization header's value
                    r"[^\s\"',;}\]]+"                                  # (not one redacted already)
                    r"|\b(?:sk-|hf_|gsk_|xai-)[A-Za-z0-9_\-]{16,}")  # providers' key formats
MIN_SECRET = 8   # shorter values (a "1" in some *_TOKEN variable) would redact ordinary text


def secret_values() -> list[str]:
    """The values of the environment's secret-named variables, longest first."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return SHAPED.sub(lambda m: (m.group().split()[0] + " " if m.group()[0] in "Bb" else "")
                      + REDACTED, text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's final message (installed on the handlers of
    the command-line entry points)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Redact on every handler of the root logger (and any added later through basicConfig)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
