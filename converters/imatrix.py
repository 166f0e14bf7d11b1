"""Importance matrix: how strongly calibration text drives each input column of every linear weight.

llama.cpp's quantizers weight each weight's rounding error by the mean
squared activation of its input column, so the columns that carry large
activations are rounded most carefully. edgepack measures those means on the
float reference with transformers (a hook on every linear layer of the
decoder blocks and on an untied output head), names each entry after its GGUF
tensor with gguf-py's ``TensorNameMap`` (llama's Q/K row permutation moves
rows, never input columns), and writes llama.cpp's own file so that
``llama-quantize --imatrix`` can reuse it.

File format: llama.cpp's legacy ``imatrix.dat`` (``tools/imatrix``), little-endian::

    int32 n_entries
    n_entries x {int32 name_len, char name[name_len], int32 ncall, int32 nval, float32 value[nval]}
    int32 chunks                          calibration windows the means were taken over
    int32 dataset_len, char dataset[dataset_len]

``value = mean * ncall`` with ``ncall`` the number of windows; readers divide it back out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, InvalidModelError
from ..fsutil import atomic_path
from ..stages import Artifact, Kind, Planned, Stage, side_input
from . import calibration

FILENAME = "imatrix.dat"


@dataclass
class ImatrixFile:
    """Per-tensor mean squared input activations, as llama.cpp's quantizer takes them."""

    entries: dict[str, np.ndarray]  # GGUF tensor name -> float32 mean per input column
    chunks: int  # calibration windows
    dataset: str  # calibration text name

    def save(self, path: Path) -> None:
        ncall = max(self.chunks, 1)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(struct.pack("<i", len(self.entries)))
            for name in sorted(self.entries):
                raw = name.encode()
                values = np.ascontiguousarray(self.entries[name], dtype="<f4") * np.float32(ncall)
                f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
                f.write(values.tobytes())
            dataset = self.dataset.encode()
            f.write(struct.pack("<ii", self.chunks, len(dataset)) + dataset)

    @classmethod
    def load(cls, path: str | Path) -> ImatrixFile:
        """Read an imatrix.dat (edgepack's or llama-imatrix's legacy output); raises CalibrationError."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CalibrationError(f"cannot read importance matrix {path} ({e.strerror}): give the imatrix.dat path") from e
        try:
            return cls._parse(data)
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CalibrationError(
                f"{path} is not a llama.cpp imatrix.dat file ({e}): compute one with `edgepack` or `llama-imatrix --output-format dat`"
            ) from e

    @classmethod
    def _parse(cls, data: bytes) -> ImatrixFile:
        (n,) = struct.unpack_from("<i", data, 0)
        if n < 1:
            raise ValueError("no entries")
        pos, entries = 4, {}
        for _ in range(n):
            (length,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4 : pos + 4 + length].decode()
            pos += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, pos)
            pos += 8
            if nval < 1 or pos + 4 * nval > len(data):
                raise ValueError(f"entry {name!r} runs past the end of the file")
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            entries[name] = values / ncall if ncall > 0 else values
        chunks, dataset = 0, ""
        if pos < len(data):  # llama.cpp's trailer is optional
            chunks, length = struct.unpack_from("<ii", data, pos)
            dataset = data[pos + 8 : pos + 8 + length].decode()
        for name, values in entries.items():
            if not np.all(np.isfinite(values)):
                raise ValueError(f"entry {name!r} holds non-finite values")
        return cls(entries, chunks, dataset)

    def check(self, columns: dict[str, int], *, model: str, required: set[str]) -> None:
        """Raise CalibrationError unless every entry names a tensor of ``model`` with that many input columns.

        ``columns`` maps each GGUF tensor to its input columns (times experts);
        ``required`` are the tensors that must have an entry.
        """
        fix = "compute an importance matrix for this model (edgepack does so from its reference checkpoint)"
        for name, values in sorted(self.entries.items()):
            if name not in columns:
                raise CalibrationError(f"importance matrix entry {name!r} matches no tensor of {model}: it was made for another model; {fix}")
            if values.size != columns[name]:
                raise CalibrationError(
                    f"importance matrix entry {name!r} has {values.size} values but {model}'s tensor has {columns[name]} input columns: "
                    f"it was made for another model; {fix}"
                )
        missing = sorted(required - set(self.entries))
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise CalibrationError(f"importance matrix has no entry for {shown} of {model}: it was made for another model; {fix}")


# -- measuring on the reference model -----------------------------------------------------------


def load_reference(path: Path):
    """(model, tokenizer, GGUF names of its linear layers) for a float HF checkpoint, in float32 eval mode.

    Raises InvalidModelError, UnsupportedArchitectureError.
    """
    import torch
    from gguf import TensorNameMap
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf_arch import read_model

    arch = read_model(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
        raise InvalidModelError(f"transformers cannot load {path} ({e}): check the checkpoint") from e
    tmap = TensorNameMap(arch.spec.arch, arch.n_layer)
    head = model.get_output_embeddings()
    names: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        if mod is head:
            if not arch.tied:  # a tied head is token_embd, whose rows llama.cpp also looks up as embeddings
                names[mod_name] = "output.weight"
        elif isinstance(mod, torch.nn.Linear):
            gguf_name = tmap.get_name(mod_name + ".weight", try_suffixes=(".weight",))
            if not (gguf_name and gguf_name.startswith("blk.")):
                raise InvalidModelError(f"linear layer {mod_name!r} has no GGUF tensor name for {arch.spec.name}: it cannot be calibrated")
            names[mod_name] = gguf_name
    return model, tok, names


def calibration_windows(tok, preset: str, tokens: int, window: int, chat: bool | None) -> tuple[list[list[int]], dict[str, Any]]:
    """Token windows of calibration text and its provenance record; raises CalibrationError."""
    if tokens < window:
        raise CalibrationError(f"{tokens} calibration tokens do not fill one {window}-token window: raise tokens or lower window")
    text = calibration.load(preset, "calibration")
    chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    prefix = list(tok("", add_special_tokens=True)["input_ids"])  # BOS for tokenizers that add one, as llama.cpp does per chunk
    body = window - len(prefix)
    n = tokens // window
    ids = calibration.token_stream(text, tok, chat=chat, max_tokens=n * body)
    wins = [prefix + w for w in calibration.windows(ids, n, body)]
    record = text.provenance(n * window)
    record.update(chat=chat, windows=n, window=window)
    return wins, record


class _Activations:
    """Forward pre-hooks summing squared inputs per column of each named linear layer."""

    def __init__(self, model, names: dict[str, str]):
        import torch

        self.sums: dict[str, Any] = {}
        self.tokens = 0
        self._hooks = []
        for mod_name, mod in model.named_modules():
            if mod_name in names:
                gguf_name = names[mod_name]
                self.sums[gguf_name] = torch.zeros(mod.in_features, dtype=torch.float64)
                self._hooks.append(mod.register_forward_pre_hook(self._hook(gguf_name)))

    def _hook(self, gguf_name: str):
        def hook(module, args):
            x = args[0].detach()
            self.sums[gguf_name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)

        return hook

    def means(self) -> dict[str, np.ndarray]:
        return {name: (s / self.tokens).float().numpy() for name, s in self.sums.items()}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def measure_imatrix(model, names: dict[str, str], windows: list[list[int]]) -> dict[str, np.ndarray]:
    """Mean squared input activation per column of every named linear layer over ``windows``."""
    import torch

    head = {m: g for m, g in names.items() if g == "output.weight"}
    acts = _Activations(model, {m: g for m, g in names.items() if m not in head})
    out = torch.zeros(model.get_output_embeddings().in_features, dtype=torch.float64)
    try:
        with torch.no_grad():
            for w in windows:
                # the decoder alone: the head's input is its last hidden state, and logits are not needed
                hidden = model.base_model(torch.tensor([w])).last_hidden_state
                out += hidden.reshape(-1, hidden.shape[-1]).double().pow(2).sum(0)
                acts.tokens += len(w)
    finally:
        acts.close()
    means = acts.means()
    if head:
        means["output.weight"] = (out / acts.tokens).float().numpy()
    return means


class Imatrix(Stage):
    """HF reference checkpoint -> llama.cpp importance matrix (``imatrix.dat``) from calibration text."""

    name = "imatrix"
    version = 1
    input_kinds = (Kind.HF,)
    output_kind = Kind.FILE

    @dataclass(frozen=True)
    class Config:
        calibration: str = side_input("builtin")  # calibration.load preset: builtin, a text file, hf:DATASET[:CONFIG]:SPLIT:COLUMN
        tokens: int = 20480  # calibration tokens, rounded down to whole windows
        window: int = 512  # tokens per forward pass (llama-imatrix's context size)
        chat: bool | None = None  # chat-format the samples; None: when the tokenizer has a chat template

    def plan(self, inp: Artifact | None, config: Config) -> list[Planned]:
        return [Planned(FILENAME)]

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        model, tok, names = load_reference(inp.path)
        windows, record = calibration_windows(tok, config.calibration, config.tokens, config.window, config.chat)
        means = measure_imatrix(model, names, windows)
        out = out_dir / FILENAME
        ImatrixFile(means, len(windows), record["name"]).save(out)
        return Artifact(Kind.FILE, out, {"calibration": record, "entries": len(means), "chunks": len(windows)})
