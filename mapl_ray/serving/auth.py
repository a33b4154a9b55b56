"""Optional bearer token (RFC 6750) for the HTTP service.

The token is read where the HTTP front runs: from ``token_file`` when set, else from the environment
variable ``token_env`` (``MAPL_SERVE_TOKEN``). When there is one, every route but ``GET /healthz``
answers 401 without ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from .errors import ApiError


def load_token(token_env: str = "MAPL_SERVE_TOKEN", token_file: str | None = None) -> str | None:
    """The bearer token, or None when neither ``token_file`` nor ``$token_env`` gives one.

    Surrounding whitespace (a trailing newline of the file) is not part of the token.

    Raises:
        ValueError: ``token_file`` is missing, unreadable or empty (names the file), or ``$token_env`` is set
            but empty or blank (a secret that did not reach the environment must not open the server).
    """
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"token_file {path}: cannot read it ({e.strerror or e})") from e
        if not token:
            raise ValueError(f"token_file {path} is empty (expected the bearer token)")
        return token
    if token_env not in os.environ:
        return None
    token = os.environ[token_env].strip()
    if not token:
        raise ValueError(f"${token_env} is set but empty: set it to the bearer token, or unset it to serve without one")
    return token


def token_digest(token: str | None) -> str | None:
    """SHA-256 hex of ``token`` (None for None): lets the deploying process and a front replica check
    they read the same token without passing the secret around."""
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Accept the request when no token is configured or ``authorization`` is ``Bearer <token>``.

    The comparison takes the same time whatever the mismatch (``hmac.compare_digest``).

    Raises:
        ApiError: 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``.
    """
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return
    what = "no Authorization header" if not authorization else "a wrong bearer token"
    raise ApiError(
        401,
        "unauthorized",
        f"{what}: send 'Authorization: Bearer <token>' (every route but /healthz needs it on this server)",
        headers={"WWW-Authenticate": "Bearer"},
    )
