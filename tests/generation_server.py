"""A small OpenAI-compatible server for the tests: the standard library's http.server wrapping a tiny
``save_pretrained`` model (``GET /v1/models``, ``POST /v1/completions`` and
``/v1/chat/completions``, whose chat template is "role: content" lines), counting what it answers.

It samples with the request's ``seed`` (``torch.manual_seed`` under a lock, then ``model.generate``), so the same
request gets the same answer, as vLLM and SGLang servers give with a seed.  Faults for the tests: ``fail_after``
(answer HTTP 500 once that many requests were answered), ``malformed_after`` (answer ``{"choices": []}``), and
``hold_after`` (hold every later request without answering, until :meth:`release`: the moment a test kills its
client).  ``answered`` lists ``(prompt, seed)`` of every answer actually sent.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional


class TinyServer:
    def __init__(self, model_dir: str, served_name: str = "tiny") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.served_name = served_name
        self.answered: list[tuple[str, int]] = []
        self.texts: list[str] = []  # every completion sent, in the order the answers went out
        self.received = 0
        self.chat_requests = 0  # of them, to /v1/chat/completions
        self.admitted = 0  # requests let through to be answered
        self._admit = threading.Lock()
        self.fail_after: Optional[int] = None
        self.malformed_after: Optional[int] = None
        self.hold_after: Optional[int] = None
        self.holding = threading.Event()   # set while a request is held
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.served_name, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                chat = self.path.rstrip("/") == "/v1/chat/completions"
                if self.path.rstrip("/") != "/v1/completions" and not chat:
                    return self._send(404, {"error": "not found"})
                if chat:  # a chat template of its own: the turns as "role: content" lines, then the answer cue
                    body["prompt"] = "".join(f"{m['role']}: {m['content']}\n" for m in body["messages"]) + \
                        "assistant:"
                    server.chat_requests += 1
                with server._admit:  # decided one request at a time: the counts are exact with concurrency
                    server.received += 1
                    done = server.admitted
                    fault = next((f for f, after in (("hold", server.hold_after), ("fail", server.fail_after),
                                                     ("malformed", server.malformed_after))
                                  if after is not None and done >= after), None)
                    if fault is None:
                        server.admitted += 1
                if fault == "hold":
                    server.holding.set()
                    server._release.wait()
                    self.close_connection = True  # dropped unanswered, as a dying client's request is
                    return
                if fault == "fail":
                    return self._send(500, {"error": "the server fell over"})
                if fault == "malformed":
                    return self._send(200, {"object": "text_completion", "choices": []})
                texts, tokens = server.generate(body)
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "length"}
                           if chat else {"index": i, "text": t, "finish_reason": "length"} for i, t in enumerate(texts)]
                self._send(200, {"object": "chat.completion" if chat else "text_completion", "model": body["model"],
                                 "choices": choices, "usage": {"completion_tokens": tokens}})
                with server._admit:
                    server.answered.append((body["prompt"], body["seed"]))
                    server.texts.extend(texts)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def generate(self, body: dict) -> tuple[list[str], int]:
        from effitrain.objectives.generation import generate_plainly, plain_generation_config

        torch = self.torch
        n = int(body.get("n", 1))
        config = plain_generation_config(do_sample=body["temperature"] > 0, max_new_tokens=body["max_tokens"],
                                         pad_token_id=self.tokenizer.pad_token_id,
                                         eos_token_id=self.tokenizer.eos_token_id,
                                         temperature=body["temperature"] or 1.0, top_p=body.get("top_p", 1.0),
                                         top_k=body.get("top_k", 0))
        config.num_return_sequences = n
        enc = self.tokenizer([body["prompt"]], return_tensors="pt")
        with self._lock, torch.no_grad():  # one generation at a time: the seed decides the draw
            torch.manual_seed(int(body["seed"]))
            out = generate_plainly(self.model, config, **enc)
        new = out[:, enc["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new], int(new.numel())

    def reset_counts(self) -> None:
        with self._admit:
            self.answered.clear()
            self.texts.clear()
            self.received = self.admitted = 0

    def start(self) -> "TinyServer":
        self.thread.start()
        return self

    def release(self) -> None:
        self.hold_after = None
        self._release.set()

    def stop(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
