"""Real peers for the output channels: an MLLP listener from the ``hl7`` library answering AA / AE / AR, a
webhook receiver and a FHIR endpoint (``http.server`` threads on 127.0.0.1) that check what they get."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from hl7.mllp import start_hl7_server

from reporting.channels import fhir, webhook


class MLLPListener:
    """A RIS: ``hl7.mllp.start_hl7_server`` in its own event loop thread. ``answer`` is the ACK code it gives
    (AA, AE, AR, or "silent" to never answer); every message received is kept (parsed with ``hl7``)."""

    def __init__(self, answer: str = "AA", text: str = "") -> None:
        self.answer = answer
        self.text = text
        self.messages: list[hl7.Message] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(start_hl7_server(self._client, "127.0.0.1", 0, encoding="utf-8"))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(message)
                if self.answer == "silent":
                    continue
                ack = message.create_ack(self.answer)
                if self.text:
                    ack.segment("MSA").append(self.text)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.status = 200
        self.received: list[dict[str, Any]] = []


class WebhookReceiver:
    """A webhook endpoint: verifies each signature with ``secret`` (401 when wrong), answers ``status``, and
    keeps every delivery (headers, body, signature verdict); ``events`` is one entry per idempotency key."""

    def __init__(self, secret: str) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                valid = webhook.verify(receiver.secret, headers, body)
                with receiver.server.lock:
                    receiver.server.received.append({"headers": headers, "body": body, "valid": valid})
                    status = receiver.server.status if valid else 401
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.secret = secret
        self.server = _Receiver(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        with self.server.lock:
            return list(self.server.received)

    def events(self) -> dict[str, dict[str, Any]]:
        """Accepted deliveries by idempotency key (a repeat replaces, as a receiver would drop it)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.deliveries:
            if d["valid"]:
                out[d["headers"]["idempotency-key"]] = json.loads(d["body"])
        return out

    def set_status(self, status: int) -> None:
        with self.server.lock:
            self.server.status = status

    def stop(self) -> None:
        self.server.shutdown()


class FhirEndpoint:
    """A FHIR server's DiagnosticReport endpoint: PUT validated with ``fhir.resources`` (400 with an
    OperationOutcome when invalid), kept by id, 201 then 200."""

    def __init__(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                resource_id = self.path.rsplit("/", 1)[-1]
                try:
                    fhir.validate(body)
                    ok = body.get("id") == resource_id and self.path.startswith("/fhir/DiagnosticReport/")
                except ValueError:
                    ok = False
                with endpoint.server.lock:
                    if ok:
                        created = resource_id not in endpoint.resources
                        endpoint.resources[resource_id] = body
                        endpoint.history.append(body)
                        status = endpoint.server.status if endpoint.server.status != 200 else (201 if created else 200)
                    else:
                        status = 400
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.end_headers()
                if status >= 400:
                    self.wfile.write(
                        json.dumps(
                            {
                                "resourceType": "OperationOutcome",
                                "issue": [
                                    {
                                        "severity": "error",
                                        "code": "invalid",
                                        "diagnostics": "refused by the test server",
                                    }
                                ],
                            }
                        ).encode()
                    )

            def log_message(self, *args: Any) -> None:
                pass

        self.resources: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.server = _Receiver(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def stopping(*peers: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for peer in peers:
            peer.stop()
