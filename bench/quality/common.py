"""Paths, logging and the llama-server client shared by the quality-benchmark scripts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("D2C_CACHE", Path.home() / ".cache" / "d2c-gguf"))
QUALITY = CACHE / "quality"
BASE_GGUF = Path(os.environ.get("D2C_BASE_MODEL", CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_SERVER = Path(os.environ.get("D2C_LLAMA_SERVER", CACHE / "llama-server" / "llama-server"))
HF_BASE = QUALITY / "base-hf"
TASKS = QUALITY / "tasks"
PEFT = QUALITY / "peft"
ADAPTERS = QUALITY / "adapters"
SPLITS = ("train", "samples", "test")


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def task_names() -> list[str]:
    return sorted(json.loads((TASKS / "tasks.json").read_text())["tasks"])


class LlamaServer:
    """A llama-server child on a free loopback port (flash attention off, as the reference)."""

    def __init__(self, model: Path = BASE_GGUF, threads: int = 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = QUALITY / "llama-server.log"
        QUALITY.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(LLAMA_SERVER), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "-c", "1024", "-np", "1", "-t", str(threads), "-fa", "off", "--no-warmup"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}; see {self.log_path}")
            try:
                if self._get("/health").get("status") == "ok":
                    break
            except Exception:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError(f"llama-server did not become healthy; see {self.log_path}")
            time.sleep(0.5)

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
