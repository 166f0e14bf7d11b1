"""A desktop chat window on edgepack's runtime: tkinter (standard library) and three calls of the public API.

    python examples/desktop_chat.py BUNDLE [--system TEXT]   # a bundle folder or name (edgepack list), or a .gguf file

The model loads and answers on a worker thread, so the window never freezes; pieces of the
answer reach the window through a queue that the Tk loop polls (Tk is not thread-safe).
Stop (or Esc) cancels the running answer from the UI thread (``Session.cancel`` is safe from any thread).
Each finished answer is also printed to stdout as one JSON line, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import tkinter as tk
from tkinter import scrolledtext

import edgepack


class ChatWindow:
    def __init__(self, root: tk.Tk, model: str, system: str = "") -> None:
        self.root, self.model = root, model
        self.session = None
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.events: queue.Queue = queue.Queue()
        root.title("edgepack chat")
        self.log = scrolledtext.ScrolledText(root, wrap="word", state="disabled", width=80, height=24)
        self.log.pack(fill="both", expand=True, padx=6, pady=6)
        bar = tk.Frame(root)
        bar.pack(fill="x", padx=6, pady=(0, 6))
        self.entry = tk.Entry(bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _e: self.send())
        self.send_button = tk.Button(bar, text="Send", command=self.send, state="disabled")
        self.send_button.pack(side="left", padx=4)
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left")
        self.status = tk.Label(root, text=f"loading {model} ...", anchor="w")
        self.status.pack(fill="x", padx=6, pady=(0, 6))
        root.bind("<Escape>", lambda _e: self.stop())
        self.entry.focus_set()
        threading.Thread(target=self._load, daemon=True).start()
        root.after(30, self._drain)

    # -- worker thread ---------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            self.events.put(("loaded", edgepack.load(self.model)))
        except edgepack.EdgepackError as e:
            self.events.put(("error", str(e)))

    def _answer(self, messages: list[dict[str, str]]) -> None:
        try:
            stream = self.session.chat_stream(messages, temperature=0, max_tokens=256)
            for piece in stream:
                self.events.put(("piece", piece))
            self.events.put(("done", stream.completion))
        except edgepack.EdgepackError as e:
            self.events.put(("error", str(e)))

    # -- UI thread -------------------------------------------------------------------------------
    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.session is None or str(self.stop_button["state"]) == "normal":
            return
        self.entry.delete(0, "end")
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": ""})
        self._write(f"you: {text}\nmodel: ")
        self.send_button["state"], self.stop_button["state"] = "disabled", "normal"
        self.status["text"] = "answering ..."
        threading.Thread(target=self._answer, args=(self.messages[:-1],), daemon=True).start()

    def stop(self) -> None:
        if self.session is not None:
            self.session.cancel()

    def _drain(self) -> None:
        try:
            while True:
                kind, value = self.events.get_nowait()
                if kind == "loaded":
                    self.session = value
                    self.send_button["state"] = "normal"
                    self.status["text"] = f"ready: {value.info.name} ({value.info.backend}, {value.info.device})"
                    print(json.dumps({"event": "ready", "model": value.info.name}), flush=True)
                elif kind == "piece":
                    self.messages[-1]["content"] += value
                    self._write(value)
                elif kind == "done":
                    self._write("\n\n")
                    self.send_button["state"], self.stop_button["state"] = "normal", "disabled"
                    self.status["text"] = f"{value.completion_tokens} tokens, {value.decode_tokens_per_s:.1f} tok/s ({value.finish_reason})"
                    print(json.dumps({"event": "answer", "text": self.messages[-1]["content"], "finish_reason": value.finish_reason}), flush=True)
                else:
                    self.status["text"] = f"error: {value}"
                    self.send_button["state"], self.stop_button["state"] = "normal" if self.session else "disabled", "disabled"
                    print(json.dumps({"event": "error", "message": value}), flush=True)
        except queue.Empty:
            pass
        self.root.after(30, self._drain)

    def _write(self, text: str) -> None:
        self.log["state"] = "normal"
        self.log.insert("end", text)
        self.log.see("end")
        self.log["state"] = "disabled"

    def close(self) -> None:
        self.stop()
        if self.session is not None:
            self.session.close()
        self.root.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description="A desktop chat window on an edgepack bundle.")
    ap.add_argument("model", help="a bundle folder or name, or a .gguf file")
    ap.add_argument("--system", default="", help="a system prompt")
    args = ap.parse_args()
    root = tk.Tk()
    window = ChatWindow(root, args.model, args.system)
    root.protocol("WM_DELETE_WINDOW", window.close)
    root.mainloop()


if __name__ == "__main__":
    main()
