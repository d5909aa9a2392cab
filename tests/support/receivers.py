"""Receivers of the daemon's notifications: a webhook endpoint and an SMTP mailbox (aiosmtpd's handler)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Records every webhook POST; answers 500 to the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[dict] = []
        self.attempts = 0
        self.fail_first = fail_first
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.attempts += 1
                if outer.attempts <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.posts.append({"body": json.loads(body), "raw": body,
                                    "signature": self.headers.get("X-Bastion-Signature")})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, key_prefix: str) -> list[tuple[str, str]]:
        return [(p["body"]["event"], p["body"]["key"]) for p in self.posts if p["body"]["key"].startswith(key_prefix)]


class Mailbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's hook name
        self.messages.append((envelope.rcpt_tos, envelope.content.decode("utf-8", "replace")))
        return "250 OK"
