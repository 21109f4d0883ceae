"""Credentials out of anything segflow prints, logs or records: one rule for every URI.

    redact_uri("https://alice:s3cret@mlflow.example.org")   # 'https://alice:***@mlflow.example.org'
    redact_uri("postgresql://mlflow:pw@db:5432/mlflow")     # 'postgresql://mlflow:***@db:5432/mlflow'
    redact_uri("https://b.s3.amazonaws.com/k?X-Amz-Signature=ab12&X-Amz-Date=1")
    #   'https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Date=1'
    redact_text("cannot reach https://u:p@host/api (timeout)")
    #   'cannot reach https://u:***@host/api (timeout)'

The user name stays (it says who connects); passwords and secret query or fragment values
become `***`. Anything else is returned exactly as given, so a path or a URI without secrets
reads the same after redaction.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import PlainSerializer

MASK = "***"

#: Query or fragment keys whose values are secrets, compared lower-cased, as whole keys...
SECRET_KEYS = frozenset({"pwd", "sig", "key", "auth", "access_key"})
#: ...or as parts of keys (password, sslpassword, client_secret, access_token, X-Amz-Signature,
#: X-Amz-Security-Token, X-Goog-Credential, api_key, apikey).
SECRET_KEY_PARTS = ("password", "passwd", "secret", "token", "signature", "credential", "apikey")
SECRET_KEY_PARTS += ("api_key", "api-key")

# Where a URI starts and ends inside free text: a scheme, "://", then anything up to white
# space, a quote or an angle bracket. Each match is then read by urllib, not by this pattern.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def is_secret_key(key: str) -> bool:
    """Whether a query parameter named `key` (percent-encoded or not) carries a secret."""
    name = unquote(key).strip().lower()
    return name in SECRET_KEYS or any(part in name for part in SECRET_KEY_PARTS)


def _redact_pairs(text: str) -> str:
    """`a=1&password=x` -> `a=1&password=***`; other pairs, order and encoding unchanged."""
    pairs = []
    for pair in text.split("&"):
        key, sep, value = pair.partition("=")
        pairs.append(f"{key}={MASK}" if sep and value and is_secret_key(key) else pair)
    return "&".join(pairs)


def redact_uri(uri: str) -> str:
    """`uri` with its password and secret query/fragment values replaced by `***`."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # unreadable (e.g. a stray "[" in the host): hide all but the scheme
        scheme = uri.partition("://")[0]
        return f"{scheme}://{MASK}" if "://" in uri else uri
    netloc = parts.netloc
    if password:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    query, fragment = _redact_pairs(parts.query), _redact_pairs(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri  # nothing secret: exactly what was given
    # Joined here rather than with urlunsplit, which turns `sqlite:////abs.db` into
    # `sqlite://abs.db` for schemes it does not know to have an authority.
    text = f"{parts.scheme}:" if parts.scheme else ""
    if uri[len(text) :].startswith("//"):
        text += f"//{netloc}"
    text += parts.path
    text += f"?{query}" if query else ""
    text += f"#{fragment}" if fragment else ""
    return text


def redact_text(text: str) -> str:
    """Every URI inside `text` (an error message, a log line) passed through `redact_uri`."""
    return _URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)


def redact_tree(tree: Any) -> Any:
    """A copy of nested dicts/lists (e.g. a config's `model_dump`) with every string redacted."""
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact_tree(value) for value in tree]
    return redact_text(tree) if isinstance(tree, str) else tree


def _redact_optional(uri: str | None) -> str | None:
    return None if uri is None else redact_uri(uri)


#: A URI setting whose JSON form never carries credentials: what Prefect records as a flow
#: run's parameters and what a configuration dumps, while the Python value the run itself
#: uses keeps them. Example: Runtime(tracking_uri="https://u:pw@mlflow").model_dump(mode="json")
#: holds "https://u:***@mlflow".
RedactedUri = Annotated[str | None, PlainSerializer(_redact_optional, when_used="json")]
