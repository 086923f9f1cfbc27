"""Talking to the Hugging Face Hub: fail in seconds with one clear line when it cannot be reached.

Without a network the Hub client retries for half a minute before it gives up, and offline mode
(`HF_HUB_OFFLINE=1`) surfaces as a ConnectionError deep inside `datasets`. Both become an
`ArchiFactoryError` that names the offline alternative (`dataset=text dataset.path=…`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

from archifactory.core.errors import ArchiFactoryError

OFFLINE_HINT = "train offline on local text with `dataset=text dataset.path=<file|folder|glob>`"


def offline_mode() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint: answers in milliseconds (DNS failure) or `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        None,
    )
    if proxy and url.scheme == "https":  # behind a proxy the Hub is reached through it
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def unreachable_error(what: str) -> ArchiFactoryError:
    why = "offline mode (HF_HUB_OFFLINE=1) and not in the local cache" if offline_mode() else "no network"
    return ArchiFactoryError(f"can't reach the Hugging Face Hub for {what} ({why}); {OFFLINE_HINT}")


def check_hub(what: str) -> None:
    """Raise the one-line error now, instead of after the client's retries, when the Hub is unreachable.

    In offline mode the `datasets`/`transformers` caches may still hold the files, so it does not refuse.
    """
    if not offline_mode() and not hub_reachable():
        raise unreachable_error(what)


def hub_token(env_name: str) -> str | None:
    """The access token from `env_name` (default HF_TOKEN), else the one saved by `hf auth login`."""
    token = os.environ.get(env_name)
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an unreadable token file is the same as no token
        return None


def gated_error(what: str, env_name: str) -> ArchiFactoryError:
    return ArchiFactoryError(
        f"{what} is gated: accept its terms on huggingface.co, then export {env_name}=<your access token>"
    )


@contextlib.contextmanager
def hub_errors(what: str, gated_hint: bool = False, env_name: str = "HF_TOKEN") -> Iterator[None]:
    """Turn the Hub client's connection, not-found and gated errors into one-line ArchiFactoryErrors."""
    try:
        yield
    except ArchiFactoryError:
        raise
    except Exception as error:
        text = f"{type(error).__name__}: {error}"
        lowered = text.lower()
        if "gated" in lowered or "401" in text or "403" in text or "authenticat" in lowered:
            raise gated_error(what, env_name) from error
        if (
            isinstance(error, (ConnectionError, TimeoutError, socket.gaierror))
            or "offline" in lowered
            or "connect" in lowered
            or "couldn't reach" in lowered
            or "localentrynotfound" in lowered
        ):
            raise unreachable_error(what) from error
        if any(
            m in lowered
            for m in ("doesn't exist", "not found", "notfound", "404", "not a valid model identifier")
        ):
            raise ArchiFactoryError(
                f"{what} was not found on the Hub: check the name (and its access terms)"
            ) from error
        raise
