"""No password in any output: every error, log record and echoed URL passes through here.

Two nets, because either alone can miss: the secrets the command line was given (a broker
password, the password inside a store URL) are registered as they are parsed and replaced
wherever they appear, and anything shaped like ``scheme://user:password@`` loses the password
whether or not it was registered.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote, urlsplit

__all__ = ["SECRETS", "ScrubFilter", "Secrets"]

MASK = "***"
# scheme://user:password@host: the password is everything between the first ':' after '//'
# and the '@' (no '/', '@' or whitespace inside).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")


class Secrets:
    """The secrets of this run, and :meth:`scrub`, which removes them from a text."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str | bytes | None) -> None:
        """Never show ``value`` (ignored when empty)."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value:
            self._values.add(value)

    def add_url_password(self, url: str) -> None:
        """Never show the password in ``url`` (as written, and percent-decoded)."""
        try:
            password = urlsplit(url).password
        except ValueError:
            return
        if password:
            self.add(password)
            self.add(unquote(password))

    def scrub(self, text: str) -> str:
        """``text`` with every registered secret and every URL password replaced by ``***``."""
        # Longest first, so a secret containing another is masked whole.
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, MASK)
        return _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)


#: The secrets of this process's command.
SECRETS = Secrets()


class ScrubFilter(logging.Filter):
    """Rewrites each record's message through :data:`SECRETS` before a handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub the message (arguments merged in first) and any traceback text."""
        record.msg = SECRETS.scrub(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = SECRETS.scrub(record.exc_text)
        return True
