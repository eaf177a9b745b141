"""Secrets: one redaction rule for everything printed, logged or tracked, and credentials
read from the environment or a Prefect Secret block instead of params.yaml.

`redact` removes, from any text: the user-info part of URLs (`scheme://user:pw@host` and
`https://token@host` become `scheme://***@host`), secret query parameters (`?password=`,
`token=`, `api_key=`, ...) and libpq keywords (`password=...`). Every message, MLflow param or
tag, log line and CLI output that may hold a URL goes through it.
"""

from __future__ import annotations

import os
import re

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^\s/?#]*)@")
_SECRET_KEYS = (
    "password|passwd|pwd|pass|sslpassword|secret|client_secret|token|access_token|refresh_token|"
    "auth|auth_token|api_key|apikey|key|private_key|sig|signature|credential|credentials|"
    "x-amz-signature|x-amz-credential|x-amz-security-token"
)
_QUERY = re.compile(rf"(?P<lead>[?&;](?:{_SECRET_KEYS})=)[^&#;\s]*", re.IGNORECASE)
_KEYWORD = re.compile(r"(?P<lead>\b(?:password|sslpassword)\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
# a Prefect Secret block, in Prefect's own template syntax: {{ prefect.blocks.secret.NAME }}
_BLOCK = re.compile(r"^\{\{\s*prefect\.blocks\.secret\.(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\s*\}\}$")
_ENV = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}$")


def redact(text: object) -> str:
    """`text` with every credential in it replaced by `***` (URL user info, secret query
    parameters, libpq password keywords). Idempotent; leaves text without secrets unchanged."""
    out = str(text)
    out = _USERINFO.sub(lambda m: f"{m['scheme']}***@" if m["info"] else m[0], out)
    out = _QUERY.sub(lambda m: f"{m['lead']}***", out)
    return _KEYWORD.sub(lambda m: f"{m['lead']}***", out)


def resolve(value: str | None, what: str) -> str | None:
    """A configured URL, with a credential reference replaced by its value.

    `${NAME}` reads the environment variable NAME; `{{ prefect.blocks.secret.NAME }}` reads a
    Prefect Secret block (it needs PREFECT_API_URL). Anything else is returned as it is.
    """
    if value is None:
        return None
    from pipelines.errors import ConfigError

    if env := _ENV.match(value.strip()):
        resolved = os.environ.get(env["name"])
        if not resolved:
            raise ConfigError(f"{what} is ${{{env['name']}}}, but the environment variable is not set")
        return resolved
    if block := _BLOCK.match(value.strip()):
        return _secret_block(block["name"], what)
    return value


def _secret_block(name: str, what: str) -> str:
    from pipelines.errors import ConfigError, TransientError

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            f"{what} reads the Prefect Secret block {name!r}, which needs a Prefect server: set "
            f"PREFECT_API_URL, or use ${{ENV_VAR}} instead"
        )
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name).get())
    except ValueError as exc:  # Prefect: "Unable to find block document named ..."
        raise ConfigError(
            f"{what}: Prefect Secret block {name!r} does not exist; create it with "
            f"`prefect block create secret` or Secret(value=...).save({name!r})"
        ) from exc
    except Exception as exc:  # the server did not answer
        raise TransientError(f"{what}: cannot read Prefect Secret block {name!r}: {redact(exc)}") from exc
