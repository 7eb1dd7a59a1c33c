"""The pre-enrollment webhook: before a first enrollment with a claim, an operator's service
is asked whether this device may enroll: the registry's (``CERTFLEET_REGISTRY_EST_WEBHOOK_URL``)
and the claim's own (``certfleet factory claim create --webhook URL``), each of which must
allow it.

The registry POSTs JSON once the claim and its allow-list have let the request through::

    {"device_id": "...", "hardware_serial": "..." | null, "claim": "<batch>",
     "claim_serial": "<hex>", "from": "<client address>" | null}

and expects, within ``CERTFLEET_REGISTRY_EST_WEBHOOK_TIMEOUT_S`` for the whole exchange:

- ``200`` with ``{"decision": "allow"}``: the device enrolls;
- ``200`` with ``{"decision": "deny", "reason": "..."}``, or a ``403``: refused (403, with the
  reason);
- ``200`` with ``{"decision": "pending", "retry_after_s": N}``, or a ``202`` (its
  Retry-After header honoured): the device gets 202 with Retry-After (RFC 7030 4.2.3) and
  asks again later; the webhook is asked again then.

Anything else (no answer in time, a connection refused, another status, a body that is not
such JSON) **fails closed**: the enrollment is refused with a 503 naming what went wrong, and
nothing is issued.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Final

import anyio
import httpx

from fleetcore.webhooks import shown_url
from registry.est.errors import (
    EnrollmentPendingError,
    EnrollmentRefusedError,
    EnrollmentWebhookError,
)

__all__ = ["EnrollmentQuestion", "PreEnrollmentWebhook"]

log = logging.getLogger(__name__)

#: Retry-After of the 503 when the webhook fails: a short wait, then the device asks again.
FAILED_RETRY_AFTER_S: Final = 10
#: An answer longer than this is not a decision.
_MAX_ANSWER_BYTES: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class EnrollmentQuestion:
    """What the webhook is told about one enrollment."""

    device_id: str
    hardware_serial: str | None
    claim: str
    claim_serial: str
    from_addr: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "hardware_serial": self.hardware_serial,
            "claim": self.claim,
            "claim_serial": self.claim_serial,
            "from": self.from_addr,
        }


class PreEnrollmentWebhook:
    """Asks ``url`` (module doc); :meth:`decide` returns when the device may enroll and
    raises EnrollmentRefusedError, EnrollmentPendingError or EnrollmentWebhookError."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        pending_retry_after_s: int,
        label: str = "the pre-enrollment webhook",
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.pending_retry_after_s = pending_retry_after_s
        #: how messages name it: the registry's, or a claim's own.
        self.label = label
        #: how messages and logs name the URL (no query: it may carry a token).
        self.shown = shown_url(url)

    async def decide(self, question: EnrollmentQuestion) -> None:
        try:
            with anyio.fail_after(self.timeout_s):
                status, headers, body = await self._post(question)
        except TimeoutError:
            raise self._failed(question, f"no answer within {self.timeout_s:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise self._failed(question, f"{type(exc).__name__}: {exc}") from None
        self._judge(question, status, headers, body)
        log.info(
            "est webhook allowed device_id=%s claim=%s webhook=%s",
            question.device_id,
            question.claim,
            self.shown,
        )

    async def _post(self, question: EnrollmentQuestion) -> tuple[int, httpx.Headers, bytes]:
        # trust_env off: no proxy from the environment between the registry and its webhook.
        async with (
            httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client,
            client.stream("POST", self.url, json=question.as_json()) as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > _MAX_ANSWER_BYTES:
                    break
            return response.status_code, response.headers, bytes(body)

    def _judge(
        self, question: EnrollmentQuestion, status: int, headers: httpx.Headers, body: bytes
    ) -> None:
        who = f"device {question.device_id} (claim {question.claim})"
        if status == 403:
            raise EnrollmentRefusedError(
                f"{self.label} refused {who}: {_text(body) or 'no reason given'}"
            )
        if status == 202:
            raise self._pending(who, _retry_after(headers.get("retry-after")))
        if status != 200:
            raise self._failed(question, f"it answered HTTP {status}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        decision = answer.get("decision") if isinstance(answer, dict) else None
        if decision == "allow":
            return
        if decision == "deny":
            reason = str(answer.get("reason") or "no reason given")[:300]
            raise EnrollmentRefusedError(f"{self.label} refused {who}: {reason}")
        if decision == "pending":
            retry = answer.get("retry_after_s")
            raise self._pending(who, retry if isinstance(retry, int) and retry > 0 else None)
        raise self._failed(
            question,
            'its answer is not JSON {"decision": "allow" | "deny" | "pending"}: '
            f"{_text(body)[:120]!r}",
        )

    def _pending(self, who: str, retry_after_s: int | None) -> EnrollmentPendingError:
        retry = min(retry_after_s or self.pending_retry_after_s, 86_400)
        return EnrollmentPendingError(
            f"the enrollment of {who} awaits approval; ask again in {retry} s "
            "with the same request",
            retry_after_s=retry,
        )

    def _failed(self, question: EnrollmentQuestion, what: str) -> EnrollmentWebhookError:
        return EnrollmentWebhookError(
            f"{self.label} {self.shown} gave no decision for device "
            f"{question.device_id} (claim {question.claim}): {what}; nobody enrolls until it "
            "answers (fails closed)",
            retry_after_s=FAILED_RETRY_AFTER_S,
        )


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip()[:300]


def _retry_after(value: str | None) -> int | None:
    """Retry-After in seconds (an HTTP date is not honoured: our own default then)."""
    if value is not None and value.strip().isdigit():
        return max(1, int(value.strip()))
    return None
