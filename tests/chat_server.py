"""A fake OpenAI-compatible chat-completions server for tests of the HTTP clients (the
openai labeller and paraphraser): real sockets on 127.0.0.1, scripted failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """A real chat-completions server on 127.0.0.1. ``answer(body)`` writes the assistant's
    reply to a request. ``script`` holds actions for the next requests in order (then
    ``default``): ok, 429, 500, 401, malformed, nocontent, notag, refusal, slow."""

    def __init__(self, answer: Callable[[dict], str], default="ok"):
        self.answer = answer
        self.script: list[str] = []
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    action = server.script.pop(0) if server.script else server.default
                if action in ("429", "500", "401"):
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "nope"}}')
                    return
                content = {"notag": "<explanation>\nA\nB\n",
                           "refusal": "I'm sorry, but I cannot help with that."}.get(action)
                if content is None:
                    content = server.answer(body)
                if action == "slow":
                    time.sleep(1.0)
                payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(payload).encode()
                if action == "malformed":
                    data = b'{"choices": [ this is not json'
                if action == "nocontent":
                    data = b'{"choices": []}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
