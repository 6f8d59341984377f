"""Webhooks: HMAC-signed JSON events, delivered at least once through the outbox.

The headers follow the Standard Webhooks convention: ``webhook-id`` (the event id, also sent as
``Idempotency-Key``: the same for every retry of one event, so a receiver drops repeats),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature`` =
``v1,`` + base64(HMAC-SHA256(secret, "<id>.<timestamp>.<body>")). A receiver recomputes the signature
over the raw body and refuses a timestamp more than a few minutes off (replays).

Bodies carry no patient data (no name, patient ID or accession number): the study's registry id and
Study Instance UID, and for version events the version, its kind and status; a receiver reads the rest
through the API (or the FHIR endpoint) with its own key. Any 2xx is success; anything else, a timeout or
a refused connection is retried with the outbox's backoff, then DEAD.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime
from typing import Any

import httpx

from reporting.channels.base import Delivery, DeliveryError

SIGNATURE_VERSION = "v1"


def event_body(event: str, at: datetime, data: dict[str, Any]) -> dict[str, Any]:
    """A new event: its id (the idempotency key), type, time and data. Frozen in the outbox row."""
    return {"id": f"evt_{uuid.uuid4().hex}", "type": event, "timestamp": at.isoformat(), "data": data}


def encode(body: dict[str, Any]) -> bytes:
    """The exact bytes sent and signed (compact, keys sorted: the same for every retry)."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def sign(secret: str, event_id: str, timestamp: int, payload: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` over ``<id>.<timestamp>.<payload>``."""
    signed = f"{event_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(
    secret: str, headers: dict[str, str], payload: bytes, *, tolerance_s: float = 300.0, now: float | None = None
) -> bool:
    """What a receiver does (used by our tests' receiver and documented for integrators)."""
    try:
        event_id, timestamp = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, event_id, timestamp, payload)
    return any(hmac.compare_digest(expected, given) for given in headers.get("webhook-signature", "").split())


def send(delivery: Delivery, url: str, secret: str, timeout_s: float) -> str:
    """POST one event; 2xx is delivered, anything else raises ``DeliveryError`` (the outbox retries)."""
    if not delivery.payload:
        raise DeliveryError("a webhook row carries an event body")
    payload = encode(delivery.payload)
    event_id = delivery.idempotency_key
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "radialog-node-webhooks",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, event_id, timestamp, payload),
        "Idempotency-Key": event_id,
    }
    try:
        response = httpx.post(url, content=payload, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"webhook POST to {url} failed: {type(exc).__name__}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"webhook receiver {url} answered {response.status_code}", response.text[:200] or None)
    return f"{response.status_code} (webhook {delivery.payload.get('type')})"
