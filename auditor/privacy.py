"""What may be kept of a prompt or a completion, and of anything that quotes one (errors, logs).

`AUDITOR_PRIVACY_MODE`:

    full      the text and its sha256
    redacted  the text with personal data and secrets masked by typed placeholders ([EMAIL],
              [PHONE], [IP], [CARD], [IBAN], [SECRET], [NUMBER]), and the sha256 of the original
    hash      the sha256 only

The digest lets an auditor check whether a known text was served without the store keeping it.
It is a plain sha256, so whoever holds the database can confirm a *guess*: a short prompt, or (in
redacted mode, where the rest of the text is visible) a guessed value behind a placeholder.

Everything here is pure except `install_log_redaction`, which sets this process's log-record
factory so that, outside full mode, no log line carries what the mode does not store.

Size: the masking patterns and every place that applies them (stored text, errors, logs, task
arguments) are reviewed together; a privacy review reads one file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from auditor.errors import AuditorError

MODES = ("full", "redacted", "hash")

# ---- detectors, in the order they run: secrets first (a key may contain an email-like or
# digit-heavy run), then addresses and account numbers, then the generic fallbacks ----

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.S)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^\s/:@]+:[^\s/@]+(?=@)")
# An Authorization header's credentials (with a digit: "basic understanding" is English).
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z0-9\-._~+/]*\d)[A-Za-z0-9\-._~+/]{8,}=*")
# `password: hunter2`, `api_key="..."`, `client-secret = ...`: keep the name, mask the value.
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api|access|secret|private|auth|client)[_-]?(?:key|token|secret)|secret|password|passwd|pwd"
    r"|passphrase|token)(\s*[:=]\s*)(\"[^\"\n]*\"|'[^'\n]*'|[^\s,;\"']+)"
)
_KNOWN_KEYS = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}"  # OpenAI, Anthropic
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|A(?:KIA|SIA)[0-9A-Z]{16}"  # AWS access key id
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|glpat-[A-Za-z0-9_\-]{20,})"  # GitLab
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# 13-19 digits, optionally grouped by single spaces or hyphens.
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,5}"  # international: +44 20 7946 0958, +1 (415) 555-0132
    r"|\(\d{2,4}\)[ .\-]?\d{3,4}[ .\-]?\d{3,4}"  # (415) 555-0132
    r"|\d{3}[.\-]\d{3}[.\-]\d{4}|\d{3} \d{3} \d{4}"  # 415-555-0132, 415 555 0132
    r"|0\d(?:[ .\-]?\d{2}){4}"  # 06 12 34 56 78
    r"|0\d{2,4}[ \-]\d{3,4}[ \-]?\d{3,4}"  # 020 7946 0958
    r")(?![\w])"
)
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
# Word-bounded, so the digits inside an id (chatcmpl-<hex>, a uuid) are left alone.
_LONG_DIGITS = re.compile(r"(?<![\w.\-])\d{9,}(?![\w\-]|\.\d)")
# A long token mixing upper case, lower case and digits: a key of an unknown vendor. (Lowercase
# hex such as request ids, uuids and sha256 digests is left alone: they identify rows, not people.)
_OPAQUE_TOKEN = re.compile(r"(?<![\w+=-])(?=[\w+=-]*[a-z])(?=[\w+=-]*[A-Z])(?=[\w+=-]*\d)[A-Za-z0-9_+=-]{32,}")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _card(match: re.Match) -> str:
    # Not a card number (or a mistyped one): still an account-like number.
    return "[CARD]" if luhn_valid(re.sub(r"\D", "", match.group())) else "[NUMBER]"


def _iban(match: re.Match) -> str:
    """The longest prefix that passes the checksum (the pattern may run on into the next
    upper-case word)."""
    text = match.group()
    for end in range(len(text), 14, -1):
        if text[end - 1] != " " and iban_valid(text[:end]):
            return "[IBAN]" + text[end:]
    return text


def _ipv6(match: re.Match) -> str:
    text = match.group()
    if text.count(":") < 2 or not any(c.isalnum() for c in text):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return "[IP]"


def _phone(match: re.Match) -> str:
    n_digits = sum(c.isdigit() for c in match.group())
    return "[PHONE]" if 7 <= n_digits <= 15 else match.group()


Rule = tuple[re.Pattern, "str | Callable[[re.Match], str]"]
RULES: list[Rule] = [
    (_PEM, "[SECRET]"),
    (_URL_CREDENTIALS, "[SECRET]"),
    (_BEARER, r"\1\2[SECRET]"),
    (_ASSIGNED_SECRET, r"\1\2[SECRET]"),
    (_KNOWN_KEYS, "[SECRET]"),
    (_JWT, "[SECRET]"),
    (_EMAIL, "[EMAIL]"),
    (_IBAN, _iban),
    (_CARD, _card),
    (_IPV6, _ipv6),
    (_IPV4, "[IP]"),
    (_PHONE, _phone),
    (_SSN, "[NUMBER]"),
    (_LONG_DIGITS, "[NUMBER]"),
    (_OPAQUE_TOKEN, "[SECRET]"),
]


def redact(text: str) -> str:
    """`text` with emails, phone numbers, IP addresses, card numbers (Luhn-checked), IBANs
    (checksum-checked), keys, tokens, passwords and long digit runs replaced by typed
    placeholders. Idempotent: a placeholder is never matched again."""
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise AuditorError(f"privacy mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def strictest(modes: Iterable[str]) -> str:
    """The mode that keeps least, of several that apply (a process's and a row's)."""
    return max(modes, key=MODES.index, default="full")


def stored_text(text: str | None, mode: str) -> tuple[str | None, str | None]:
    """(text to store, sha256 of the original text to store) under `mode`."""
    check_mode(mode)
    digest = sha256_text(text)
    if text is None or mode == "hash":
        return None, digest
    return (text if mode == "full" else redact(text)), digest


def shown_text(mode: str, text: str | None, sha256: str | None) -> str | None:
    """What a report may show of a stored prompt or completion: the text in full mode, the text
    redacted again in redacted mode, `sha256:<hex>` in hash mode — never more than the mode
    promises, even when a row holds more (one written before the mode changed)."""
    if mode == "full":
        return text
    if mode == "redacted":
        return None if text is None else redact(text)
    return None if sha256 is None else f"sha256:{sha256}"


# ---- errors that may quote a prompt ----

TEXT_PLACEHOLDER = "[TEXT]"
_MIN_QUOTED = 3  # shorter texts would mask ordinary words of the message


def _variants(text: str) -> list[str]:
    """The forms an exception message may quote a text in: as is, and escaped as repr() does."""
    escaped = repr(text)[1:-1]
    return [variant for variant in {text, escaped, text.strip()} if len(variant) >= _MIN_QUOTED]


def scrub(message: str, mode: str, texts: Iterable[str | None] = ()) -> str:
    """`message` (an error, a log line) fit for `mode`: unchanged in full mode; otherwise every
    quotation of `texts` (the request's prompt, messages and completion) replaced by [TEXT],
    then redacted."""
    if mode == "full":
        return message
    variants = sorted({v for text in texts if text for v in _variants(text)}, key=len, reverse=True)
    for variant in variants:
        message = message.replace(variant, TEXT_PLACEHOLDER)
    return redact(message)


def request_texts(payload: dict[str, Any]) -> list[str]:
    """Every user-supplied text in a generation or audit payload."""
    texts = [payload.get("prompt"), payload.get("completion")]
    for message in payload.get("messages") or []:
        texts.append(message.get("content") if isinstance(message, dict) else None)
    return [text for text in texts if isinstance(text, str) and text]


def scrubbed_exception(exc: BaseException, mode: str, texts: Sequence[str]) -> BaseException:
    """`exc` itself when its message is fit for `mode`; else the same type (or an AuditorError
    naming it) with the scrubbed message. Raise it `from None`: a chained original would print
    the text in every traceback."""
    message = str(exc)
    clean = scrub(message, mode, texts)
    if clean == message:
        return exc
    try:
        replacement = type(exc)(clean)
    except Exception:  # a constructor that wants more than a message
        return AuditorError(f"{type(exc).__name__}: {clean}")
    if str(replacement) != clean:
        return AuditorError(f"{type(exc).__name__}: {clean}")
    return replacement


def task_argsrepr(args: Sequence[Any]) -> str:
    """What Celery may show of a task's arguments (worker logs, `celery inspect`, events): ids,
    never payloads. The message body still carries them to the worker."""
    shown = []
    for arg in args:
        if isinstance(arg, str) and len(arg) <= 80:
            shown.append(repr(arg))
        elif isinstance(arg, (list, tuple)) and all(isinstance(a, str) and len(a) <= 80 for a in arg):
            shown.append(repr(list(arg)))
        elif isinstance(arg, (list, tuple)):
            shown.append(f"<{len(arg)} items hidden>")
        else:
            shown.append(f"<{type(arg).__name__} hidden>")
    return f"[{', '.join(shown)}]"


# ---- logs ----

# Records whose formatter needs the original args (uvicorn's access formatter unpacks them);
# they carry a method, a path and a client address, never a body.
_KEEP_ARGS = frozenset({"uvicorn.access"})
_HIDDEN = "<hidden: privacy mode>"
_log_mode = "full"
_base_factory: Callable[..., logging.LogRecord] | None = None


def _hide_payloads(record: logging.LogRecord) -> None:
    """Celery's own lines that quote payloads: a task's return value (a completion) on success,
    and at DEBUG the raw message body handed to the pool."""
    args = record.args
    if isinstance(args, dict) and "return_value" in args:
        record.args = {**args, "return_value": _HIDDEN}
    elif isinstance(record.msg, str) and record.msg.startswith("TaskPool: Apply") and isinstance(args, tuple):
        record.args = (args[0], _HIDDEN, _HIDDEN) if len(args) == 3 else args


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    assert _base_factory is not None
    record = _base_factory(*args, **kwargs)
    if _log_mode == "full" or record.name in _KEEP_ARGS:
        return record
    try:
        _hide_payloads(record)
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    except Exception:  # a broken log call must fail where logging reports it, not here
        pass
    return record


def install_log_redaction(mode: str) -> None:
    """From now on, in this process: outside full mode every log record's message and traceback
    is redacted, and Celery's lines that quote task payloads or results hide them. Idempotent;
    the last call's mode wins (one process serves one mode)."""
    global _log_mode, _base_factory
    _log_mode = check_mode(mode)
    if _base_factory is None:
        _base_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_redacting_factory)
