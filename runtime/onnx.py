"""The ONNX backend, through onnxruntime-genai (``og.Model``, ``og.Generator``, ``og.Tokenizer``).

A folder qualifies when it holds ``genai_config.json`` (what onnxruntime-genai's model
builder writes). Sampling stays inside ``og.Generator``'s own search; only ``min_p``,
which genai lacks, reads the logits in Python, and only when it is asked for. A JSON
schema or a GBNF grammar is enforced by genai's guidance (llguidance) as the same grammar
the llama.cpp backend uses (``schema.grammar``), rewritten in llguidance's Lark syntax, so
both backends allow exactly the same answers.

Text goes through ``tokenizer.gguf``, the vocabulary-only GGUF edgepack's ONNX stage writes,
with llama.cpp's tokenizer as the GGUF backend uses it (``llamacpp.Vocab``), so both backends
give transformers' ids without the ``tokenizers`` package in the runtime. ``og.Tokenizer``
differs from transformers around SentencePiece whitespace and special tokens (it adds the
dummy-prefix space after them), so it serves only folders made elsewhere, which have no
``tokenizer.gguf``. The chat template comes from ``chat_template.jinja`` or ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendError, InvalidModelError, MissingDependencyError, UsageError
from .base import NO_TEMPLATE_HINT, ModelInfo, SamplingParams, Scores, Session, Slots
from .registry import Backend
from .schema import grammar
from .threads import Governor, physical_cores

if TYPE_CHECKING:
    from .llamacpp import Vocab

# The doctor's probe, y = x + x on a float[1], serialized; the runtime has no onnx package to build it. Made by
# onnx.helper: make_model(make_graph([make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y]), opset 13, ir_version=8)
# (tests/runtime/test_onnx.py builds it again and compares).
PROBE_MODEL = bytes.fromhex(
    "080812003a390a0e0a01780a01781201792203416464120570726f62655a0f0a0178120a0a08080112040a020801"
    "620f0a0179120a0a08080112040a02080142040a00100d"
)

# onnxruntime_genai, imported by _og() on first use: importing this module (as the registry does) loads no library.
og = None
VOCAB_FILE = "tokenizer.gguf"  # written by the ONNX stage (converters/gguf.py write_vocab)


def _og():
    """Import onnxruntime-genai once; raises MissingDependencyError."""
    global og
    if og is None:
        try:
            import onnxruntime_genai
        except ImportError as e:  # a core dependency, but doctor reports a broken install
            raise MissingDependencyError("onnxruntime-genai", purpose="running ONNX models") from e
        og = onnxruntime_genai
    return og


def devices() -> list[str]:
    """CUDA first when the CUDA build of onnxruntime-genai is installed (the ``cuda`` extra), then CPU."""
    return ["cuda", "cpu"] if _og().is_cuda_available() else ["cpu"]


class OnnxBackend(Backend):
    name = "onnx"
    formats = ("onnx",)
    what = "an ONNX folder (with genai_config.json)"
    install = "install the CUDA extra: pip install 'edgepack[cuda]'"
    can_embed = True  # folders exported with hidden states (OnnxSession._embed)
    busy_copy = True  # OnnxSession._model_now

    needs = {"onnxruntime_genai": "onnxruntime-genai"}

    def claims(self, path: Path) -> bool:
        return path.is_dir() and (path / "genai_config.json").is_file()

    def devices(self) -> list[str]:
        return devices()

    def open(
        self, path: Path, *, device: str, n_ctx: int | None, threads: int | None, kv_type: str = "f16", draft: str | None = None
    ) -> OnnxSession:
        return OnnxSession(path, device=device, n_ctx=n_ctx, threads=threads)

    def probe(self, device: str, folder: Path) -> bool:
        """ONNX Runtime adds one and one on ``device`` (a one-node graph; onnxruntime-genai, which runs the models, must import too)."""
        import onnxruntime as ort

        _og()
        provider = {"cuda": "CUDAExecutionProvider"}.get(device, "CPUExecutionProvider")
        session = ort.InferenceSession(PROBE_MODEL, providers=[provider])
        if provider not in session.get_providers():  # ONNX Runtime falls back to the CPU quietly
            raise BackendError(f"ONNX Runtime has no {provider} here: {self.install}")
        return float(session.run(None, {"x": np.ones(1, np.float32)})[0][0]) == 2.0


BACKEND = OnnxBackend()


class OnnxSession(Session):
    def __init__(self, path: Path, *, device: str, n_ctx: int | None, threads: int | None) -> None:
        _og()
        try:
            genai = json.loads((path / "genai_config.json").read_text())
            trained = int(genai["model"]["context_length"])
            self._vocab = int(genai["model"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidModelError(
                f"{path}/genai_config.json is unreadable or lacks model.context_length or vocab_size ({e}): re-convert the model"
            ) from e
        self._path, self._device = path, device
        pool = threads or physical_cores()
        self._model = self._load(pool)
        # the pool is fixed per model: a one-thread copy, loaded when other programs first take cores
        self._threads = Governor(pool, fixed=threads is not None or device != "cpu" or pool == 1)
        self._narrow: og.Model | None = None
        if (path / VOCAB_FILE).is_file():
            from .llamacpp import open_vocab

            self._tok: Vocab | _OgTokenizer = open_vocab(path / VOCAB_FILE)
        else:
            self._tok = _OgTokenizer(self._model, path)
        eos = genai["model"].get("eos_token_id", [])
        self._eos = set(eos if isinstance(eos, list) else [eos])
        n_ctx = min(n_ctx or 4096, trained)
        super().__init__(ModelInfo(path=path, backend="onnx", device=device, n_ctx=n_ctx, threads=pool))

    def _load(self, threads: int) -> og.Model:
        try:
            config = og.Config(str(self._path))
            config.clear_providers()
            if self._device == "cuda":
                config.append_provider("cuda")
            config.overlay(json.dumps({"model": {"decoder": {"session_options": _session_options(threads)}}}))
            return og.Model(config)
        except Exception as e:  # noqa: BLE001 - og raises plain RuntimeError for every failure
            raise BackendError(f"onnxruntime-genai could not load {self._path}: {e}. Re-convert it, or check `edgepack doctor`") from e

    def _model_now(self) -> og.Model:
        """The model whose pool fits the cores other programs leave free (``_session_options`` says why)."""
        if self._threads.fresh() >= self._threads.most:
            return self._model
        if self._narrow is None:
            self._narrow = self._load(1)
        return self._narrow

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        self._check_open()
        return self._tok.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` with special tokens written out, like transformers' ``decode``."""
        self._check_open()
        return self._tok.detokenize([int(t) for t in tokens])

    def _chat_template(self) -> tuple[str, dict[str, str]]:
        cfg = {}
        tc = self._path / "tokenizer_config.json"
        if tc.is_file():
            cfg = json.loads(tc.read_text())
        jinja = self._path / "chat_template.jinja"
        src = jinja.read_text() if jinja.is_file() else cfg.get("chat_template")
        if not isinstance(src, str) or not src:
            raise UsageError(f"{self._path} has no chat template (chat_template.jinja or tokenizer_config.json), so it cannot chat: {NO_TEMPLATE_HINT}")
        specials = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = cfg.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                specials[name] = v
        return src, specials

    # -- running -------------------------------------------------------------------------------
    def _generator(self, params: SamplingParams | None, max_length: int, model: og.Model | None = None):
        model = model or self._model
        gp = og.GeneratorParams(model)
        opts: dict = {"max_length": max_length}
        if params is not None:
            opts["repetition_penalty"] = params.repeat_penalty
            if params.temperature == 0:
                opts["do_sample"] = False
            else:
                opts.update(
                    do_sample=True,
                    temperature=params.temperature,
                    top_k=params.top_k or self._vocab,
                    top_p=params.top_p,
                )
                if params.seed is not None:
                    opts["random_seed"] = params.seed
        gp.set_search_options(**opts)
        if params is not None and (params.schema is not None or params.grammar is not None):
            gp.set_guidance("lark_grammar", lark(params.grammar if params.schema is None else grammar(params.schema)))
        return og.Generator(model, gp)

    def _generate(self, tokens: list[int], params: SamplingParams, cancelled: threading.Event) -> Iterator[str]:
        self._check_open()
        model = self._model_now()  # its own BackendError when the one-thread copy cannot load
        try:
            gen = self._generator(params, self.n_ctx, model)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"onnxruntime-genai could not start a generation with these options: {e}") from e
        try:
            gen.append_tokens(np.asarray(tokens, dtype=np.int32))
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"onnxruntime-genai failed on a {len(tokens)}-token prompt: {e}") from e
        text = self._tok.stream()
        min_p = params.min_p if params.temperature > 0 else 0.0
        while not gen.is_done():
            if min_p:
                gen.set_logits(_min_p(gen.get_logits(), min_p))
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if tok in self._eos:
                return
            yield text(tok)

    def _score(self, tokens: list[int], top_k: int) -> Scores:
        self._check_open()
        gen = self._generator(None, self.n_ctx)
        # One append: genai's chunked prefill runs other int4 kernels, so chunks would shift the numbers.
        gen.append_tokens(np.asarray(tokens[:-1], dtype=np.int32))
        return Scores.of(gen.get_output("logits")[0], tokens[1:], top_k)

    def slots(self, n: int) -> Slots:
        """Refused: onnxruntime-genai 0.18 batches continuously only on CUDA or WebGPU.

        Its ``og.Engine`` needs a PagedAttention model for that (``engine.dynamic_batching``), which the
        model builder makes only for CUDA fp16/bf16 or WebGPU. On a CPU folder it falls back to static
        batches of up to 4 requests: a request joins, and a leaving one's row frees, only when the whole
        batch ends, and per-request seeds and stop strings are refused (tests/runtime/test_onnx.py
        ``test_cpu_engine_batches_statically``). Serving requests in turn keeps both properties.
        """
        raise UsageError(
            f"onnxruntime-genai {og.__version__} batches ONNX models on a CPU only statically (a request joins, and a leaving "
            "client's place frees, when the whole batch ends; continuous batching needs a CUDA or WebGPU PagedAttention build): "
            "serve this model with --parallel 1, or a GGUF variant for parallel slots"
        )

    def _check_constraint(self, params: SamplingParams) -> None:
        if (params.schema is not None or params.grammar is not None) and not hasattr(og.GeneratorParams, "set_guidance"):
            raise UsageError(f"onnxruntime-genai {og.__version__} cannot constrain output (no guidance): pip install -U onnxruntime-genai")

    def _embed(self, tokens: list[list[int]]) -> np.ndarray:
        """The mean of each text's last hidden states, read from the model's ``hidden_states`` output.

        onnxruntime-genai's builder writes that output only when asked (its ``include_hidden_states``
        option; edgepack's ONNX stage asks since stage version 5). A folder without it cannot embed.
        One generator per text, a prompt each: genai's batching needs equal lengths.
        """
        self._check_open()
        out = []
        for ids in tokens:
            gen = self._generator(None, len(ids) + 1)
            try:
                gen.append_tokens(np.asarray(ids, dtype=np.int32))
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"onnxruntime-genai failed on a {len(ids)}-token input: {e}") from e
            try:
                states = gen.get_output("hidden_states")
            except Exception as e:  # noqa: BLE001 - og raises plain RuntimeError for an output the model lacks
                raise UsageError(
                    f"{self._path} has no hidden_states output, so it cannot embed: re-convert it (edgepack's ONNX stage exports "
                    "hidden states since version 5, the builder's include_hidden_states) or embed with a GGUF variant"
                ) from e
            out.append(states[0].astype(np.float64).mean(axis=0))
        return np.stack(out)

    def _check_open(self) -> None:
        if self._model is None:
            raise UsageError("this session is closed: load the model again")

    def _close(self) -> None:
        self._tok.close()
        self._model = self._narrow = None


def _session_options(threads: int) -> dict:
    """ONNX Runtime's pool of ``threads``, spinning while they wait, work handed out in small blocks.

    The pool is fixed when the model loads, so its size cannot follow the machine's load as
    llama.cpp's does (``threads`` module). Measured on SmolLM2 int4, 2 cores, decode tok/s idle /
    beside one busy process / beside two: 2 spinning threads 177 / 62 / 46; the same with
    ``dynamic_block_base`` 4 (faster threads take more blocks) 201 / 64 / 50; 2 sleeping
    threads 117 / 95 / 86; 1 thread 107 / 100 / 65. So a session keeps the fast pool for an
    idle machine and, while other programs hold cores, decodes each generation on a one-thread
    copy of the model (loaded the first time: +90 MB for SmolLM2 int4). Greedy output is the
    same on both.
    """
    return {"intra_op_num_threads": threads, "session.dynamic_block_base": "4"}


def _min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens less likely than min_p times the likeliest, as llama.cpp's min-p sampler does."""
    floor = logits.max(axis=-1, keepdims=True) + np.log(min_p)
    return np.where(logits >= floor, logits, np.float32(-np.inf))


class _OgTokenizer:
    """onnxruntime-genai's own tokenizer, for ONNX folders without ``tokenizer.gguf`` (see the module docstring)."""

    def __init__(self, model, path: Path) -> None:
        try:
            self._tok = og.Tokenizer(model)
        except Exception as e:  # noqa: BLE001 - og raises plain RuntimeError
            raise InvalidModelError(f"{path} has no tokenizer onnxruntime-genai can read ({e}): re-convert the model") from e
        self._lock = threading.Lock()  # add_special is an option of the tokenizer, set per call

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        with self._lock:
            self._tok.update_options(add_special_tokens="true" if add_special else "false")
            return [int(t) for t in self._tok.encode(text)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(np.asarray(tokens, dtype=np.int32))

    def stream(self):
        """A function from each generated token to its new text."""
        return self._tok.create_stream().decode

    def close(self) -> None:
        self._tok = None


_GBNF = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*) | (?P<define>::=) | (?P<literal>"(?:[^"\\]|\\.)*") | (?P<klass>\[(?:[^\]\\]|\\.)*\])
      | (?P<name>[a-zA-Z0-9_-]+) | (?P<repeat>\{\s*\d+\s*(?:,\s*\d*\s*)?\}) | (?P<op>[()|?*+.])""",
    re.X,
)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def lark(gbnf: str) -> str:
    """llama.cpp GBNF (root rule ``root``) as an llguidance Lark grammar: rules become ``g_<name>``
    (Lark wants lower case, no dashes), character classes and ``.`` regex terminals; UsageError on
    text that is not GBNF."""
    out, pos = [], 0
    while pos < len(gbnf):
        m = _GBNF.match(gbnf, pos)
        if m is None:
            raise UsageError(f"grammar: cannot read GBNF at {gbnf[pos : pos + 20]!r}: check its syntax (llama.cpp's grammars/README.md)")
        pos, kind, text = m.end(), m.lastgroup, m.group()
        if kind == "skip":
            continue
        if kind == "name":
            nxt = _GBNF.match(gbnf, pos)
            while nxt is not None and nxt.lastgroup == "skip":
                nxt = _GBNF.match(gbnf, nxt.end())
            name = "g_" + text.lower().replace("-", "_")
            out.append(f"\n{name}:" if nxt is not None and nxt.lastgroup == "define" else name)
        elif kind == "define":
            continue
        elif kind == "literal":
            chars = _gbnf_chars(text[1:-1])
            out.append(json.dumps("".join(chr(c) for c in chars), ensure_ascii=False) if chars else '""')
        elif kind == "klass":
            negate = text.startswith("[^")
            chars, ranges = _gbnf_chars(text[2 if negate else 1 : -1], dashes=True), []
            i = 0
            while i < len(chars):  # a dash between two characters makes a range
                if i + 2 < len(chars) and chars[i + 1] == -1:
                    ranges.append((chars[i], chars[i + 2]))
                    i += 3
                else:
                    ranges.append((45, 45) if chars[i] == -1 else (chars[i], chars[i]))
                    i += 1
            body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
            out.append(f"/[{'^' if negate else ''}{body}]/")
        elif text == ".":
            out.append("/(?s:.)/")
        elif kind == "repeat" or text in "?*+":
            out[-1] += text.replace(" ", "")  # postfix: no space before it
        else:
            out.append(text)
    return "start: g_root" + " ".join(out).replace(" \n", "\n") + "\n"


def _gbnf_chars(text: str, dashes: bool = False) -> list[int]:
    """Code points of GBNF literal or class text, escapes decoded; with ``dashes`` an unescaped ``-`` is -1."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            e = text[i + 1]
            width = {"x": 2, "u": 4, "U": 8}.get(e)
            if width:
                out.append(int(text[i + 2 : i + 2 + width], 16))
                i += 2 + width
                continue
            out.append(ord(_ESCAPES.get(e, e)))
            i += 2
            continue
        out.append(-1 if dashes and c == "-" else ord(c))
        i += 1
    return out
