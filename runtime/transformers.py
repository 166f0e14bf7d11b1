"""The transformers backend: GPTQ checkpoints, and any float checkpoint when asked for by name.

A folder is claimed when its ``config.json`` has a ``quantization_config`` (what the GPTQ
stage writes); its kernels come from GPTQModel (the ``gptq`` extra), which also loads the
checkpoints with per-module bit widths that transformers cannot. ``backend="transformers"``
also takes a plain checkpoint folder, loaded in float32 whatever it was saved in: that is
how eval runs the float reference.

Generation is one forward per token over transformers' KV cache, sampling in torch with
llama.cpp's filter order (penalties -> top-k -> top-p -> min-p -> temperature -> draw).
Greedy is the argmax of the same logits ``generate(do_sample=False)`` reads (the prompt
forward keeps only the last row's logits, as ``generate`` does), so its tokens are
``generate``'s. Text and chat templates come from the checkpoint's own tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, InvalidModelError, MissingDependencyError, UsageError
from .base import NO_TEMPLATE_HINT, ModelInfo, SamplingParams, Scores, Session
from .registry import Backend

if TYPE_CHECKING:
    import numpy as np


def _torch():
    """torch, once transformers is known to import too; raises MissingDependencyError."""
    try:
        import torch
        import transformers  # noqa: F401 - what every caller imports next
    except ImportError as e:  # the runtime-only install has no torch: it comes with the convert extra
        raise MissingDependencyError(e.name or "torch", extra="convert", purpose="running checkpoints with transformers") from e
    return torch


def _quant_config(path: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a checkpoint folder, None for a float one (or no readable config.json)."""
    try:
        qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qcfg if isinstance(qcfg, dict) else None


def _quant_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of a checkpoint folder ("gptq"), None for a float one."""
    qcfg = _quant_config(path)
    return None if qcfg is None else str(qcfg.get("quant_method", "unknown"))


def gptq_kernel(path: Path, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for the GPTQ checkpoint at ``path``. GPTQModel 7.7 picks its fused CPU kernel
    for groups of 16 as well, but torch's int4 CPU matmul under it takes groups of 32 and up (the first forward
    fails), so smaller groups (gptq:4's default) load on the CPU with GPTQModel's plain torch kernel."""
    from transformers import GPTQConfig

    qcfg = _quant_config(path) or {}
    if device == "cpu" and 0 < int(qcfg.get("group_size", -1)) < 32:
        return {"quantization_config": GPTQConfig(bits=int(qcfg["bits"]), backend="torch")}
    return {}


def _load_mixed_gptq(path: Path, device: str):
    """A GPTQ checkpoint with per-module bit widths (``gptq:4 --mixed-bits``, GPTQModel's ``dynamic`` rules), loaded
    by GPTQModel itself: transformers (through optimum) gives every module the checkpoint's one width and refuses
    the 8-bit tensors. On the CPU with GPTQModel's torch kernel, as ``gptq_kernel`` explains."""
    try:
        from gptqmodel import BACKEND, GPTQModel
    except ImportError as e:
        raise MissingDependencyError("gptqmodel", extra="gptq", purpose=f"running the GPTQ checkpoint {path.name}") from e
    return GPTQModel.load(str(path), device=device, backend=BACKEND.TORCH if device == "cpu" else BACKEND.AUTO).model


class TransformersBackend(Backend):
    name = "transformers"
    formats = ("gptq",)
    what = "a GPTQ checkpoint folder"
    install = "install a CUDA build of torch (pytorch.org lists the command for each CUDA version)"
    can_embed = True
    overhead = 1200 * 2**20  # torch, transformers, GPTQModel: bench measured 1,012 MiB for SmolLM2 gptq:4, 790 MiB in float32

    def claims(self, path: Path) -> bool:
        return path.is_dir() and _quant_method(path) == "gptq"

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    needs = {"torch": "torch", "transformers": "transformers"}
    extra = "convert"

    def missing(self, fmt: str) -> str | None:
        gptq = fmt == "gptq" and importlib.util.find_spec("gptqmodel") is None
        return super().missing(fmt) or ("gptqmodel" if gptq else None)

    def require(self, fmt: str) -> None:
        if (dist := self.missing(fmt)) is not None:  # the gptq extra brings convert's libraries too
            raise MissingDependencyError(dist, extra="gptq" if fmt == "gptq" else self.extra, purpose=f"running {fmt} variants with {self.name}")

    def devices(self) -> list[str]:
        return ["cuda", "cpu"] if _torch().cuda.is_available() else ["cpu"]

    def open(
        self, path: Path, *, device: str, n_ctx: int | None, threads: int | None, kv_type: str = "f16", draft: str | None = None
    ) -> TransformersSession:
        return TransformersSession(path, device=device, n_ctx=n_ctx, threads=threads)

    def probe(self, device: str, folder: Path) -> bool:
        """One forward of a tiny random llama, built from a config, on ``device``."""
        torch = _torch()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        model = LlamaForCausalLM(cfg).to(device).eval()
        with torch.inference_mode():
            logits = model(torch.tensor([[1, 2, 3]], device=device)).logits
        return bool(torch.isfinite(logits).all())


BACKEND = TransformersBackend()


def _import_gptqmodel(path: Path) -> None:
    try:
        from ..converters.gptq import import_gptqmodel

        import_gptqmodel()
    except ImportError as e:  # MissingDependencyError is one
        raise MissingDependencyError("gptqmodel", extra="gptq", purpose=f"running the GPTQ checkpoint {path.name}") from e


class TransformersSession(Session):
    def __init__(self, path: Path, *, device: str, n_ctx: int | None, threads: int | None) -> None:
        torch = _torch()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        method = _quant_method(path)
        if threads:
            torch.set_num_threads(threads)
        # GPTQModel prints its banner and kernel choices to stdout, where `edgepack run` writes the answer
        with contextlib.redirect_stdout(sys.stderr):
            if method == "gptq":  # GPTQ kernels, imported as the GPTQ stage does (its CPU-worker setting)
                _import_gptqmodel(path)
            try:
                self._tok = AutoTokenizer.from_pretrained(path)
                # float checkpoints in float32 whatever they were saved in; quantized kernels want their own dtype
                if method == "gptq" and (_quant_config(path) or {}).get("dynamic"):
                    model = _load_mixed_gptq(path, device).eval()
                else:
                    kernel = gptq_kernel(path, device) if method == "gptq" else {}
                    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if method else torch.float32, **kernel).to(device).eval()
            except ImportError as e:  # a quantized checkpoint whose loader is not installed (optimum, for GPTQ)
                if method == "gptq":
                    raise MissingDependencyError(e.name or "optimum", extra="gptq", purpose=f"running the GPTQ checkpoint {path.name}") from e
                raise BackendError(f"transformers could not load {path}: {e}") from e
            except (OSError, ValueError) as e:
                raise InvalidModelError(f"transformers cannot load {path} ({e}): re-pull or re-convert it") from e
            except Exception as e:  # noqa: BLE001 - loaders and kernels raise many types
                raise BackendError(f"transformers could not load {path}: {e}. Check it with `edgepack inspect {path}`") from e
        self._model = model
        self._device = device
        accepted = inspect.signature(model.forward).parameters
        self._keep_last = "logits_to_keep" in accepted
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.2x
        eos = model.generation_config.eos_token_id
        eos = self._tok.eos_token_id if eos is None else eos
        self._eos = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        trained = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        n_ctx = min(n_ctx or 4096, trained) if trained else n_ctx or 4096
        super().__init__(ModelInfo(path=path, backend="transformers", device=device, n_ctx=n_ctx, threads=threads))

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        self._check_open()
        return self._tok(text, add_special_tokens=add_special)["input_ids"]

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._check_open()
        return self._tok.decode([int(t) for t in tokens], skip_special_tokens=False)

    def _chat_template(self) -> tuple[str, dict[str, str]]:
        self._check_open()
        src = self._tok.chat_template
        if not isinstance(src, str) or not src:
            raise UsageError(f"{self.info.path} has no chat template, so it cannot chat: {NO_TEMPLATE_HINT}")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return src, {n: v for n in names if isinstance(v := getattr(self._tok, n, None), str)}

    # -- running -------------------------------------------------------------------------------
    def _forward(self, ids: list[int], cache, last_only: bool):
        """The last row of logits of one forward over ``ids``, after what ``cache`` holds (which it then holds too)."""
        torch = _torch()
        extra = {"logits_to_keep": 1} if last_only and self._keep_last else {}
        with torch.inference_mode():  # per call: a stream may be resumed on another thread
            out = self._model(input_ids=torch.tensor([ids], device=self._device), use_cache=True, **{self._cache_arg: cache}, **extra)
        return out.logits[0, -1]

    def _generate(self, tokens: list[int], params: SamplingParams, cancelled: threading.Event) -> Iterator[str]:
        self._check_open()
        torch = _torch()
        draw = torch.Generator(device=self._device)
        if params.seed is None:
            draw.seed()
        else:
            draw.manual_seed(params.seed)
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        logits = self._forward(tokens, cache, True)
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self._device)  # for repeat_penalty: prompt and output
        seen[torch.tensor(tokens, device=self._device)] = True
        out: list[int] = []
        shown = ""
        while not cancelled.is_set():
            tok = _pick(torch, logits.float().clone(), params, seen, draw)  # a clone: the filters write into it
            if tok in self._eos:
                return
            out.append(tok)
            seen[tok] = True
            # The whole answer decoded each time: pieces then join to what tokenizer.decode gives; an
            # incomplete UTF-8 sequence (a trailing U+FFFD) waits for the next token.
            text = self._tok.decode(out, skip_special_tokens=True)
            piece = "" if text.endswith("\ufffd") else text[len(shown) :]
            shown += piece
            yield piece
            logits = self._forward([tok], cache, False)

    def _score(self, tokens: list[int], top_k: int) -> Scores:
        self._check_open()
        torch = _torch()
        with torch.inference_mode():
            # every token in, the last row dropped: the very forward the float reference was always scored with
            logits = self._model(input_ids=torch.tensor([tokens], device=self._device)).logits[0, :-1]
        return Scores.of(logits.float().cpu().numpy(), tokens[1:], top_k)

    def _embed(self, tokens: list[list[int]]) -> np.ndarray:
        """The mean of each text's last hidden states (after the final norm), as the llama.cpp backend pools a chat model."""
        self._check_open()
        torch = _torch()
        with torch.inference_mode():
            states = [self._model.base_model(input_ids=torch.tensor([ids], device=self._device)).last_hidden_state[0] for ids in tokens]
            return torch.stack([h.float().mean(0) for h in states]).cpu().numpy()

    def _check_open(self) -> None:
        if self._model is None:
            raise UsageError("this session is closed: load the model again")

    def _close(self) -> None:
        self._model = None
        if self._device == "cuda":
            _torch().cuda.empty_cache()


def _pick(torch, logits, params: SamplingParams, seen, draw) -> int:
    """The next token from one row of logits, by ``params`` (llama.cpp's chain order; greedy at temperature 0)."""
    if params.repeat_penalty != 1.0:  # transformers' rule: divide positive logits, multiply negative ones
        hit = logits[seen]
        logits[seen] = torch.where(hit > 0, hit / params.repeat_penalty, hit * params.repeat_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    if 0 < params.top_k < logits.shape[-1]:
        logits[logits < torch.topk(logits, params.top_k).values[-1]] = -float("inf")
    if params.top_p < 1.0:  # the smallest set of likeliest tokens whose mass reaches top_p
        order = logits.argsort(descending=True)
        mass = logits[order].softmax(-1).cumsum(-1)
        logits[order[1:][mass[:-1] >= params.top_p]] = -float("inf")
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits[probs < params.min_p * probs.max()] = -float("inf")
    probs = (logits / params.temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=draw))
