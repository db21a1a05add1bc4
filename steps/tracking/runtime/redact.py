"""One helper that takes credentials out of any text before it is printed or logged.

Tracking and database URIs may carry a password (``http://user:secret@host``,
``postgresql+psycopg2://user:secret@host/db``), a bare token as user info
(``https://token@host``) or a token in the query (``?token=...``, a SAS ``sig=...``). Every
message of this project goes through :func:`redact` (error lines in
``steps.tracking.runtime.cli``, log records through :class:`RedactingFilter`, run links), so
none reaches a console or a CI log.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://userinfo@ : the user name stays (it says who), the password goes.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^\s/@?#'\"<>]+)@")
# ?key=value or &key=value where the key looks like a credential.
_QUERY = re.compile(r"(?P<lead>[?&;])(?P<key>[^=&\s#'\"<>]+)=(?P<value>[^&\s#'\"<>]*)")
_SECRET_KEY = re.compile(r"token|passw|pwd|secret|signature|^sig$|credential|api[-_]?key|"
                         r"access[-_]?key|auth", re.IGNORECASE)


def _mask_userinfo(match: re.Match) -> str:
    user, colon, _password = match.group("info").partition(":")
    # user:password -> user:***; a lone token (no colon) is itself the secret.
    return f"{match.group('scheme')}{user + ':' + MASK if colon else MASK}@"


def _mask_query(match: re.Match) -> str:
    value = MASK if _SECRET_KEY.search(match.group("key")) and match.group("value") else \
        match.group("value")
    return f"{match.group('lead')}{match.group('key')}={value}"


def redact(text: str) -> str:
    """``text`` with every URI's password and token-like query values replaced by ***."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(_mask_query, _USERINFO.sub(_mask_userinfo, text))


class RedactingFilter(logging.Filter):
    """Redacts each record's final message (arguments merged in) before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
