"""Which remote servers the user configured: a TOML file named by ``LMKERNEL_REMOTE``.

Configured, never guessed: nothing is contacted unless the user named it. The file (default
``$XDG_CONFIG_HOME/lmkernel/remote.toml``, else ``~/.config/lmkernel/remote.toml``)::

    [servers.gpu]                       # its models are listed as remote/gpu/<model id>
    urls = ["http://10.0.0.5:8000/v1",  # replicas of one deployment: load-balanced, failed over
            "http://10.0.0.6:8000/v1"]
    api_key_env = "VLLM_API_KEY"        # or api_key = "..." (sent as a bearer token)
    models = ["meta-llama/Llama-3.1-8B-Instruct"]   # optional: only these (default: /v1/models)
    context_length = 8192               # optional: when the server does not report it
    timeout = 60                        # seconds to connect, and between two streamed chunks
    sampling = "extended"               # or "openai": send only the OpenAI API's own fields

Every mistake is reported with the file, the server and the rule (:class:`RemoteConfigError`).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ._http import Url

__all__ = ["RemoteConfigError", "Server", "config_path", "load_servers"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEYS = {"url", "urls", "api_key", "api_key_env", "models", "context_length", "timeout", "sampling",
         "health_interval"}


class RemoteConfigError(ValueError):
    """The remote-servers file breaks a rule (the message names the file, the server and the rule)."""


@dataclass(frozen=True)
class Server:
    """One configured deployment: a name, its replicas' base URLs, how to talk to it."""

    name: str
    urls: tuple[Url, ...]
    api_key: str | None = None
    models: tuple[str, ...] | None = None
    context_length: int | None = None
    timeout: float = 60.0
    sampling: str = "extended"
    health_interval: float = 5.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def config_path() -> Path | None:
    """The file to read: ``LMKERNEL_REMOTE``, else the default path if it exists, else ``None``."""
    named = os.environ.get("LMKERNEL_REMOTE")
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    default = Path(base) / "lmkernel" / "remote.toml"
    return default if default.is_file() else None


def load_servers(path: Path) -> list[Server]:
    """Read and check the file; raise :class:`RemoteConfigError` naming what is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RemoteConfigError(f"{path} (LMKERNEL_REMOTE): no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RemoteConfigError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RemoteConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"servers"})
    if unknown:
        raise RemoteConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)} (expected [servers.<name>])")
    servers = data.get("servers", {})
    if not isinstance(servers, dict):
        raise RemoteConfigError(f"{path}: 'servers' must be a table of [servers.<name>] tables")
    return [_server(path, name, table) for name, table in servers.items()]


def _server(path: Path, name: str, table: object) -> Server:
    where = f"{path}: [servers.{name}]"
    if not _NAME.match(name):
        raise RemoteConfigError(f"{where}: a server name is 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if not isinstance(table, dict):
        raise RemoteConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise RemoteConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    if ("url" in table) == ("urls" in table):
        raise RemoteConfigError(f"{where}: give exactly one of 'url' (a base URL) and 'urls' (a list of replicas)")
    raw = [table["url"]] if "url" in table else table["urls"]
    if not isinstance(raw, list) or not raw or not all(isinstance(u, str) for u in raw):
        raise RemoteConfigError(f"{where}: 'urls' must be a non-empty list of base URLs, got {raw!r}")
    urls = []
    for text in raw:
        try:
            urls.append(Url.parse(text))
        except ValueError as exc:
            shown = re.sub(r"//[^/]*@", "//***@", text)  # a password is not repeated
            raise RemoteConfigError(f"{where}: {shown!r} is not an http:// or https:// base URL "
                                    f"(such as http://127.0.0.1:8000/v1): {exc}") from None
    api_key = table.get("api_key")
    if "api_key_env" in table:
        if api_key is not None:
            raise RemoteConfigError(f"{where}: give one of 'api_key' and 'api_key_env', not both")
        api_key = os.environ.get(str(table["api_key_env"]))
        if not api_key:
            raise RemoteConfigError(f"{where}: api_key_env names {table['api_key_env']!r}, which is not set")
    if api_key is not None and (not isinstance(api_key, str) or not re.fullmatch(r"[!-~]*", api_key)):
        source = f"the key in ${table['api_key_env']}" if "api_key_env" in table else "'api_key'"
        raise RemoteConfigError(f"{where}: {source} must be a string of printable ASCII characters without spaces "
                                "(it is sent in an HTTP header)")
    models = table.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
        raise RemoteConfigError(f"{where}: 'models' must be a list of model ids, got {models!r}")
    context = table.get("context_length")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise RemoteConfigError(f"{where}: 'context_length' must be a positive integer, got {context!r}")
    seconds = {}
    # health checks more often than 10 times a second would keep the kernel's loop busy
    for key, default, least in (("timeout", 60.0, 0.0), ("health_interval", 5.0, 0.1)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value and least <= value <= 86400):
            raise RemoteConfigError(f"{where}: {key!r} must be a number of seconds from {least:g} to 86400, "
                                    f"got {value!r}")
        seconds[key] = float(value)
    sampling = table.get("sampling", "extended")
    if sampling not in ("extended", "openai"):
        raise RemoteConfigError(f"{where}: 'sampling' must be 'extended' or 'openai', got {sampling!r}")
    return Server(name, tuple(urls), api_key, None if models is None else tuple(models), context,
                  seconds["timeout"], sampling, seconds["health_interval"])
