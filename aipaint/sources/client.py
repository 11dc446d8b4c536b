"""HTTP for the sources: base URLs, API tokens, redirects, and messages that never show a secret.

The base URLs are configurable so that a mirror (or a test's loopback server) can stand in:
``$AIPAINT_CIVITAI_BASE_URL`` (default ``https://civitai.com``) and ``$AIPAINT_HF_ENDPOINT``,
else ``$HF_ENDPOINT`` (default ``https://huggingface.co``).

Tokens: Civitai's from ``$CIVITAI_API_TOKEN``, the Hub's from ``$HF_TOKEN``, else from the
file ``$AIPAINT_HOME/tokens.json`` (``{"civitai": "…", "huggingface": "…"}``). A token is sent
as ``Authorization: Bearer …`` only to its own service's origin (scheme, host and port): the
client follows redirects itself, so a download that a service redirects to a storage host
never carries it. Every message this module makes is passed through :meth:`Client.scrub`,
which replaces the tokens it knows, ``Bearer …`` values and URL query values with ``***``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from aipaint.errors import AipaintError, DownloadError, InvalidParameter

DEFAULT_CIVITAI_BASE_URL = "https://civitai.com"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
MAX_REDIRECTS = 10
TOKEN_FILE = "tokens.json"
TOKEN_ENV = {"civitai": ("CIVITAI_API_TOKEN",), "huggingface": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
SERVICE_NAMES = {"civitai": "Civitai", "huggingface": "the Hugging Face Hub"}
_MIN_SECRET = 4  # shorter "tokens" are not replaced (they would mangle ordinary words)


def _base(value: str, variable: str) -> str:
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameter(variable, value, "must be an http(s) URL such as https://civitai.com")
    return value


def civitai_base_url() -> str:
    """``$AIPAINT_CIVITAI_BASE_URL``, else https://civitai.com (no trailing slash)."""
    return _base(os.environ.get("AIPAINT_CIVITAI_BASE_URL") or DEFAULT_CIVITAI_BASE_URL, "AIPAINT_CIVITAI_BASE_URL")


def hf_endpoint() -> str:
    """``$AIPAINT_HF_ENDPOINT``, else ``$HF_ENDPOINT``, else https://huggingface.co."""
    value = os.environ.get("AIPAINT_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    return _base(value, "AIPAINT_HF_ENDPOINT")


SERVICE_BASES = {"civitai": civitai_base_url, "huggingface": hf_endpoint}


def token_file() -> Path:
    from aipaint.plugin.kit.folders import aipaint_home

    return aipaint_home() / TOKEN_FILE


def api_token(service: str) -> str | None:
    """The API token for ``service`` ("civitai" or "huggingface"): its environment variable, else
    the token file. None when neither has one. Never print what this returns."""
    for variable in TOKEN_ENV[service]:
        value = os.environ.get(variable, "").strip()
        if value:
            return value
    path = token_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AipaintError(f"cannot read the token file {path} ({type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except ValueError:
        # The file's text is never quoted: it holds secrets.
        raise AipaintError(f"the token file {path} is not valid JSON; write it as "
                           '{"civitai": "<token>", "huggingface": "<token>"}') from None
    value = data.get(service) if isinstance(data, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


def shown_url(url: str) -> str:
    """The URL as messages and cards show it: no user name or password, no query, no fragment
    (signed storage URLs and pasted ``?token=`` links carry secrets there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


_REASONS = (
    (("NameResolutionError", "Name or service not known", "getaddrinfo", "nodename nor servname"), "its name cannot be resolved"),
    (("Connection refused", "ConnectionRefusedError"), "connection refused"),
    (("ConnectTimeout", "timed out", "Timeout"), "timed out"),
    (("SSLError", "CERTIFICATE_VERIFY_FAILED"), "TLS certificate or handshake error"),
    (("ProxyError",), "the proxy failed"),
    (("Connection reset", "RemoteDisconnected", "Connection aborted", "IncompleteRead", "Connection broken"),
     "the connection was cut"),
)
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_QUERY_VALUE = re.compile(r"([?&][^=\s&#'\"]+=)[^&\s#'\"]*")
_USERINFO = re.compile(r"(?i)(https?://)[^/\s@]+@")


class Client:
    """One user's HTTP conversation with the sources: a ``requests`` session, the tokens in use
    and the secrets to keep out of messages."""

    def __init__(self) -> None:
        self._session: Any = None
        self._tokens: dict[tuple[str, str, int | None], str] = {}
        self._secrets: set[str] = set()

    # --- secrets ---------------------------------------------------------------------------
    def use_token(self, service: str) -> bool:
        """Send ``service``'s token (if one is configured) to that service's origin from now on."""
        token = api_token(service)
        if not token:
            return False
        self._tokens[origin(SERVICE_BASES[service]())] = token
        self._secrets.add(token)
        return True

    def has_token_for(self, url: str) -> bool:
        return origin(url) in self._tokens

    def scrub(self, text: str) -> str:
        """``text`` with every known token, ``Bearer`` value, URL password and query value replaced."""
        text = " ".join(str(text).split())
        for secret in sorted(self._secrets, key=len, reverse=True):
            if len(secret) >= _MIN_SECRET:
                text = text.replace(secret, "***")
        text = _BEARER.sub(r"\1***", text)
        text = _USERINFO.sub(r"\1***@", text)
        return _QUERY_VALUE.sub(r"\1***", text)

    def failure(self, message: str, cause: BaseException | None = None) -> DownloadError:
        """A :class:`DownloadError` whose message (with the cause, in a few words) is scrubbed."""
        if cause is not None:
            message = f"{message} ({self.reason(cause)})"
        return DownloadError(self.scrub(message))

    def reason(self, exc: BaseException) -> str:
        """Why a request failed, in a few words (the transport's own text is long and nested)."""
        text = f"{type(exc).__name__} {exc}"
        for needles, words in _REASONS:
            if any(n in text for n in needles):
                return words
        detail = self.scrub(f"{type(exc).__name__}: {exc}")
        return detail if len(detail) <= 160 else detail[:160] + "…"

    # --- requests --------------------------------------------------------------------------
    def session(self) -> Any:
        if self._session is None:
            import requests

            from aipaint import __version__

            self._session = requests.Session()
            self._session.headers["User-Agent"] = f"aipaint/{__version__}"
        return self._session

    def request(self, url: str, *, headers: dict[str, str] | None = None, stream: bool = False,
                what: str = "the download") -> Any:
        """GET ``url``, following redirects here (a token goes only to its own origin). Raises
        :class:`DownloadError` when the host cannot be reached; any HTTP status is returned."""
        import requests

        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise self.failure(f"{what}: refused a redirect to {shown_url(url)} (only http and https are followed)")
            sent = dict(headers or {})
            token = self._tokens.get(origin(url))
            if token:
                sent["Authorization"] = f"Bearer {token}"
            try:
                response = self.session().get(url, headers=sent, stream=stream, allow_redirects=False,
                                              timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
            except requests.RequestException as exc:
                host = urlsplit(url).hostname or url
                raise self.failure(f"could not reach {host} for {what} ({self.reason(exc)}); check the network "
                                   "connection (this machine may be offline)") from None
            location = response.headers.get("Location")
            if response.status_code in (301, 302, 303, 307, 308) and location:
                response.close()
                url = urljoin(url, location)
                continue
            return response
        raise self.failure(f"{what}: more than {MAX_REDIRECTS} redirects")

    def check(self, response: Any, what: str, *, service: str | None = None) -> None:
        """Raise a one-line :class:`DownloadError` unless ``response`` succeeded (2xx)."""
        status = response.status_code
        if 200 <= status < 300:
            return
        url = shown_url(response.url or "")
        if status in (401, 403):
            if service is not None:
                variable = TOKEN_ENV[service][0]
                had = "was refused" if self.has_token_for(response.url or "") else "is needed"
                hint = (f"an API token for {SERVICE_NAMES[service]} {had}: set {variable} or put it in "
                        f"{token_file()} as {{\"{service}\": \"<token>\"}}")
                if service == "huggingface":
                    hint += " (and accept the model's licence on its page if it is gated)"
            else:
                hint = "the server refused access"
            raise self.failure(f"{what}: HTTP {status} from {url}; {hint}")
        if status == 404:
            raise self.failure(f"{what}: not found (HTTP 404 from {url})")
        if status == 429:
            raise self.failure(f"{what}: the server is rate-limiting requests (HTTP 429 from {url}); try again later")
        raise self.failure(f"{what}: HTTP {status} from {url}")

    def get_json(self, url: str, what: str, *, service: str | None = None) -> Any:
        response = self.request(url, headers={"Accept": "application/json"}, what=what)
        try:
            self.check(response, what, service=service)
            try:
                return response.json()
            except ValueError:
                raise self.failure(f"{what}: {shown_url(url)} did not answer with JSON") from None
        finally:
            response.close()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
