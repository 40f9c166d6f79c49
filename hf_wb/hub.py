"""Hub failures as one line that says what went wrong and what to do, for sharing recipes (push and pull).

`huggingface_hub` reports an unreachable Hub, a missing token or a missing repository through a chain of network
and HTTP exceptions (tens of lines of traceback); :func:`hub_error` turns them into a :class:`HubError` with one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["HubError", "hub_error", "hub_offline", "offline_error"]

_NETWORK_NAMES = ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "ProxyError")


class HubError(OSError):
    """The Hugging Face Hub could not serve a request; the message is one line naming the cause and the fix."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network at all."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def offline_error(action: str, fix: str) -> HubError:
    """The one-line error for a Hub request under ``HF_HUB_OFFLINE=1``."""
    why = "cannot reach the Hugging Face Hub (HF_HUB_OFFLINE=1)"
    return HubError(f"Cannot {action}: {why}. {fix}, or unset HF_HUB_OFFLINE and retry when online.")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _hub_related(chain: list[BaseException]) -> bool:
    modules = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")
    return any(
        isinstance(e, (ConnectionError, TimeoutError))
        or type(e).__module__.split(".")[0].rstrip("0123456789") in modules
        for e in chain
    )


def hub_error(exc: BaseException, action: str, fix: str) -> HubError | None:
    """A :class:`HubError` for ``exc``, raised while ``action`` (e.g. "push the recipe to user/repo"); None when
    ``exc`` did not come from the Hub client or the network (a bug to re-raise as it is).

    Args:
        exc: what huggingface_hub raised.
        action: what was attempted, for the message.
        fix: what the user can do instead when the Hub is unreachable (e.g. "save it locally with ...").
    """
    from huggingface_hub import errors

    chain = list(_chain(exc))
    names = [type(e).__name__ for e in chain]
    if not _hub_related(chain):
        return None
    if any(isinstance(e, errors.OfflineModeIsEnabled) for e in chain) or (
        hub_offline() and any(isinstance(e, (ConnectionError, errors.LocalEntryNotFoundError)) for e in chain)
    ):
        return offline_error(action, fix)
    if any(isinstance(e, errors.GatedRepoError) for e in chain):
        return HubError(
            f"Cannot {action}: the repository is gated. Accept its terms on huggingface.co and log in "
            "(`hf auth login`), or pass a local path."
        )
    if any(isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)) for e in chain):
        return HubError(
            f"Cannot {action}: the repository does not exist, or it is private and this token cannot see it. Check "
            "the repo id (user/name), log in with `hf auth login` or pass --token, or pass a local path."
        )
    if any(isinstance(e, (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError)) for e in chain):
        from hf_wb.config import CONFIG_NAME

        return HubError(
            f"Cannot {action}: the repository holds no {CONFIG_NAME}. Check the repo id or pass a local path."
        )
    if any(isinstance(e, errors.LocalTokenNotFoundError) for e in chain) or any(
        _status(e) in (401, 403) for e in chain
    ):
        return HubError(
            f"Cannot {action}: not authorised (no Hugging Face token, or one without write access to this "
            "repository). Log in with `hf auth login` or pass --token with a write token."
        )
    if any(isinstance(e, (ConnectionError, TimeoutError, errors.LocalEntryNotFoundError)) for e in chain) or any(
        n in _NETWORK_NAMES for n in names
    ):
        return HubError(f"Cannot {action}: cannot reach the Hugging Face Hub (no network?). {fix}, or retry online.")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HubError(f"Cannot {action}: the Hugging Face Hub refused it ({type(exc).__name__}: {first}).")
