"""Credentials stay out of everything a run writes or prints. A tracking URI may carry them
(`http://user:password@host:5000`); MLflow gets them through its own environment variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and the URI is used without them. Every
text a run writes — params, tags, config files, .hydra/, report, logs, error lines — goes through
`redact`: a URI's password and the value of any key named like a secret become `***`."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# The last part of a key that holds a secret: password, db_password, api_key, token, auth-token, ...
# (not max_new_tokens or tokenizer: the name must end with the word).
SECRET_NAME = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|credentials?)"
_SECRET_KEY = re.compile(rf"(?:^|[._-]){SECRET_NAME}$|^{SECRET_NAME}$", re.I)
# scheme://user:password@  -> scheme://user:***@
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):([^@/\s'\"]+)@")
# key=value / key: value / ?key=value where the key is named like a secret
_ASSIGNED = re.compile(rf"([\w.-]*{SECRET_NAME}['\"]?\s*[:=]\s*['\"]?)([^\s,&'\"}}\]]+)", re.I)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact(text) -> str:
    """`text` with every URI password and secret-named value replaced by ***."""
    text = _USERINFO.sub(rf"\1:{MASK}@", str(text))
    return _ASSIGNED.sub(lambda m: m.group(1) + MASK if m.group(2) != MASK else m.group(0), text)


def redact_params(params: dict) -> dict:
    """Flattened params ({'tracking.uri': ...}) with secrets masked, by key name or in the value."""
    return {k: MASK if is_secret_key(k) and v not in ("", "None") else redact(v) for k, v in params.items()}


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """'http://u:p@host:5000/x' -> ('http://host:5000/x', 'u', 'p'); a URI without them is unchanged."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("http") or "@" not in parts.netloc:
        return uri, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    return (urlunsplit(parts._replace(netloc=host)),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None)


def use_credentials(uri: str) -> str:
    """The URI without credentials; any it carried are handed to MLflow through its environment
    variables (inherited by msrun workers and sweep jobs), unless those are already set."""
    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    if password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return clean


def redact_files(*paths: Path) -> None:
    """Rewrite text files (or every file in a folder, e.g. Hydra's .hydra/) with secrets masked."""
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            clean = redact(text)
            if clean != text:
                f.write_text(clean, encoding="utf-8")


class RedactingFilter(logging.Filter):
    """On a log handler: the formatted message with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logging() -> None:
    """Mask secrets in every line the root logger's handlers write (terminal and the run's log file)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
