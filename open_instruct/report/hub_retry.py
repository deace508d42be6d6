"""The one retry policy for Hub uploads (the final model and the step checkpoints).

A fault that waiting can fix is retried: a connection refused or dropped, a timeout, a 5xx, a 408 or a 429 (rate
limit). ``TRIES`` tries in all, the waits between them ``FIRST_DELAY`` doubling each time (2, 4, 8, 16 s), capped at
``MAX_DELAY``; a 429 or 503 with a ``Retry-After`` header waits what it asks (capped the same way). Any other failure
(401/403/404, a bad request, a local file error) fails at once: retrying cannot fix it. A try is the whole push
(create the repo, the branch, upload), so a retry picks up where the Hub left off. Inside one try huggingface_hub
(2.x) also retries its own commit and preupload requests on 429/5xx/network faults (up to 5 times, 1 to 8 s): this
policy is the outer one, the one place where the project decides. Tests shorten the waits by passing a
:class:`RetryPolicy` whose ``sleep`` records instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

TRIES = 5
FIRST_DELAY = 2.0  # seconds before the second try
MAX_DELAY = 300.0  # no single wait longer, whatever a Retry-After asks
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504, 507})


@dataclass(frozen=True)
class RetryPolicy:
    """How many tries, how long between them, and how to wait."""

    tries: int = TRIES
    first_delay: float = FIRST_DELAY
    max_delay: float = MAX_DELAY
    sleep: Callable[[float], Any] = time.sleep

    def delay(self, attempt: int, err: BaseException) -> float:
        """Seconds to wait after failed try ``attempt`` (1-based): the error's ``Retry-After`` or the backoff."""
        asked = retry_after(err)
        wait = asked if asked is not None else self.first_delay * 2 ** (attempt - 1)
        return min(wait, self.max_delay)


class HubGaveUp(Exception):
    """An upload failed for good: ``tries`` tries were made, the last failing with ``cause``."""

    def __init__(self, cause: BaseException, tries: int) -> None:
        super().__init__(f"{'after ' + str(tries) + ' tries' if tries > 1 else 'at once'}: {describe(cause)}")
        self.cause, self.tries = cause, tries


def status_of(err: BaseException) -> int | None:
    """The HTTP status of a Hub error (None: no response, e.g. a network fault)."""
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def retry_after(err: BaseException) -> float | None:
    """The seconds a ``Retry-After: N`` header of the error's response asks for (None without one)."""
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff stands in
        return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport faults of the HTTP clients huggingface_hub uses (httpx in 1.x and later, requests before)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):  # fmt: skip
        try:
            imported = __import__(module)
        except ImportError:
            continue
        found += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(found)


def retryable(err: BaseException) -> bool:
    """Whether waiting could fix ``err``: a network fault, a timeout, a 5xx, 408 or 429."""
    status = status_of(err)
    if status is not None:
        return status in RETRY_STATUS or status >= 500
    return isinstance(err, _network_errors())


def describe(err: BaseException) -> str:
    """``Type: first line of the message`` (Hub errors add lines with the server message and request id)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def with_retries(action: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """``action()``, tried as ``policy`` says; raises :class:`HubGaveUp` when it fails for good."""
    policy = policy or RetryPolicy()
    for attempt in range(1, policy.tries + 1):
        try:
            return action()
        except Exception as err:  # sorted below: a fault to wait out, or one to report now
            if not retryable(err) or attempt == policy.tries:
                raise HubGaveUp(err, attempt) from err
            policy.sleep(policy.delay(attempt, err))
    raise AssertionError("unreachable: the last try returns or raises")
