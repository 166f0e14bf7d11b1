"""Distill stage: heal a pruned student by training it to match its teacher (Hinton et al., 2015).

The student is the input checkpoint, the teacher ``Config.teacher`` (the
reference the student was pruned from; their tokenizers must match). Per
token, with student logits ``z_s``, teacher logits ``z_t``, next token ``y``
and temperature ``T``::

    L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

Softening by ``T`` shows the student the teacher's whole ranking of
tokens, but it also shrinks the KL term's gradients by about ``1 / T^2``;
multiplying by ``T^2`` (Hinton et al., section 2) keeps the two terms'
balance the same whichever ``T`` is chosen, so ``alpha`` means one thing.
Classic knowledge distillation uses ``alpha`` 0.3-0.5 and ``T`` 3-5; both
are options. The defaults are ``alpha`` 0 and ``T`` 1 (plain forward KL to
the teacher) because healing aims at behaving like the teacher, which is
what the bar measures (the cross-entropy term would fit the training text
instead). benchmarks/prune_distill.py measures both settings.

Training text comes from ``calibration.load(text, "calibration")`` and is
read at most once (no epochs), so ``steps * batch`` windows must fit in it.
Presets give their calibration split, so the held-out ``eval`` split is
never trained on; a user file is used whole. ``convert`` records the text
(like the pruning calibration text) in the bundle's calibration list, and
eval skips any window sharing a 64-token span with it. Training is full
fine-tuning or LoRA (``lora`` = rank; see lora.py), on CPU or CUDA, in bf16
autocast where the device supports it (CUDA, or CPUs with AVX512-BF16/AMX,
where it is 2-3x faster than float32). The embeddings stay frozen, and so do
the leading blocks that are still bit-identical to the teacher's (all those
below the first dropped block, 13 of 24 on SmolLM2 with 6 blocks dropped):
the backward pass stops above them.

Checkpoints go to ``stages/<key>.resume/`` every ``checkpoint_s`` seconds
and on Ctrl-C (unless it lands inside an optimizer update, when the last
periodic checkpoint stands); re-running the same command resumes there
(the ``time_s`` budget counts the time already spent). With ``topk`` the teacher's top-k
logits per window are cached on disk under ``stages/teacher-topk/`` and
reused by resumed and repeated runs instead of running the teacher again;
the KL term is then taken over those k tokens, renormalised.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import CalibrationError, SourceNotFoundError, UsageError
from ..fsutil import atomic_path
from ..options import given as is_given
from ..options import number, option
from ..stages import Artifact, Kind, cache_key, side_input
from . import calibration
from .lora import merge_lora, trainable_parameters
from .prune import CheckpointStage, load_model, save_checkpoint


@dataclass(frozen=True)
class Config:
    """How to train. At least one of ``steps`` and ``time_s`` bounds the run."""

    teacher: str = side_input("")  # teacher checkpoint folder; convert passes the pulled reference
    steps: int = 0  # optimizer steps (0: as many as time_s allows, at most one pass over the text)
    time_s: float = 0.0  # training wall-clock budget in seconds, summed over resumed runs (0: no limit)
    alpha: float = 0.0  # weight of the hard-label cross-entropy; 1 - alpha weights the distillation term (classic KD: 0.3-0.5)
    temperature: float = 1.0  # softmax temperature T of the distillation term, which is scaled by T^2 (classic KD: 3-5)
    lr: float = 0.0  # AdamW learning rate (0: 3e-4 for full fine-tuning, 1e-3 for LoRA)
    lora: int = 0  # LoRA rank on every linear layer of the decoder blocks (0: full fine-tuning)
    batch: int = 1  # windows per optimizer step (small batches heal fastest under a CPU time budget: more updates)
    seq_len: int = 256  # tokens per window
    text: str = side_input("builtin")  # training text: calibration preset or file (its calibration split)
    topk: int = 0  # cache the teacher's top-k logits on disk and distill against them (0: run the teacher every step)
    device: str = "auto"  # auto (cuda when present, else cpu), cpu, cuda, cuda:N
    dtype: str = "auto"  # compute precision: auto (bf16 where the device supports it), bf16, float32
    freeze_prefix: bool = True  # keep the leading blocks that still equal the teacher's frozen (no backward through them)
    seed: int = 0  # data order and LoRA initialisation
    checkpoint_s: float = 300.0  # seconds between resume checkpoints


def validate(config: Config) -> None:
    """Check a config on its own, before any model is read; raises UsageError."""
    if not config.steps and not config.time_s:
        raise UsageError("distillation needs a bound: give `steps` N and/or `time` 15m", option="steps")
    if config.steps < 0 or config.time_s < 0 or config.batch < 1 or config.seq_len < 2 or config.lora < 0 or config.topk < 0:
        raise UsageError("steps, time, batch, lora rank and topk must be positive (seq_len at least 2)")
    if not 0.0 <= config.alpha <= 1.0:
        raise UsageError(f"`alpha` {config.alpha}: choose a weight between 0 and 1 (0 for pure distillation, classic KD 0.3-0.5)", option="alpha")
    if config.temperature <= 0:
        raise UsageError(f"`temperature` {config.temperature}: choose a positive temperature (1, or 3-5 for classic KD)", option="temperature")
    if config.dtype not in ("auto", "bf16", "float32"):
        raise UsageError(f"dtype {config.dtype!r}: choose auto, bf16 or float32")
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise UsageError(f"device {config.device!r}: choose auto, cpu, cuda or cuda:N")
    calibration.check_preset(config.text, "distill_text")


_PANEL = "Prune and distill"


@dataclass(frozen=True)
class Options:
    """What ``convert`` takes from the user for distillation; ``parse`` makes the stage's ``Config`` of them."""

    distill: bool = option(False, panel=_PANEL, help="Heal the pruned model by distilling from the original.")
    steps: int | None = option(None, metavar="N", panel=_PANEL, help="Distillation steps.")
    time: str | None = option(None, metavar="DURATION", panel=_PANEL, help="Distillation time budget, e.g. 900, 15m, 1h.")
    alpha: float | None = option(
        None, metavar="A", panel=_PANEL, help="Weight of the hard-label loss, 0-1 (default 0: pure distillation; classic KD 0.3-0.5)."
    )
    temperature: float | None = option(
        None, metavar="T", panel=_PANEL, help="Distillation temperature T, the KL term scaled by T^2 (default 1; classic KD 3-5)."
    )
    lora: bool = option(False, panel=_PANEL, help="Distill with LoRA adapters (rank 16) instead of full fine-tuning.")
    distill_text: str | None = option(
        None, metavar="PRESET", panel=_PANEL, help="Training text: builtin (its calibration split; default), a UTF-8 text file, or hf:DATASET[:CONFIG]:SPLIT:COLUMN."
    )


OPTIONS = ("distill", "steps", "time", "alpha", "temperature", "lora", "distill_text")
LORA_RANK = 16


def parse(options: Mapping[str, Any]) -> tuple[Config | None, set[str]]:
    """The distillation ``options`` ask for as a stage config (None: none), checked without a model; raises UsageError.

    The teacher is filled in by the plan (the pulled model).
    """
    given = {k: options[k] for k in OPTIONS if is_given(options.get(k)) and options[k] is not False}
    if not given.pop("distill", False):
        if given:
            raise UsageError(f"{', '.join(f'`{k}`' for k in given)} set up distillation: add `distill`", option=next(iter(given)))
        return None, set()
    fields_: dict[str, Any] = {}
    if "steps" in given:
        fields_["steps"] = number(given, "steps", 0)
    if "time" in given:
        fields_["time_s"] = seconds(given["time"])
    for key in ("alpha", "temperature"):
        if key in given:
            fields_[key] = number(given, key, 0.0, float)
    if given.get("distill_text"):
        fields_["text"] = str(given["distill_text"])
    if "lora" in given:
        fields_["lora"] = LORA_RANK if given["lora"] is True else number(given, "lora", 0)
    config = Config(**fields_)
    validate(config)
    return config, {"distill", *given}


def seconds(text: Any) -> float:
    """``900`` or ``900s`` -> 900, ``15m`` -> 900, ``1h`` -> 3600; raises UsageError."""
    text = str(text).strip()
    unit = text[-1].lower() if text[-1:].isalpha() else "s"
    try:
        return float(text.rstrip("smhSMH") or "x") * {"s": 1, "m": 60, "h": 3600}[unit]
    except (ValueError, KeyError) as e:
        raise UsageError(f"`time` {text!r}: give seconds or a duration such as 15m or 1h", option="time") from e


def check_text(config: Config, tokenizer_path: Path) -> None:
    """Raise CalibrationError now if the training text cannot feed ``config.steps``, so a convert stops before pruning."""
    from transformers import AutoTokenizer

    _training_windows(config, AutoTokenizer.from_pretrained(tokenizer_path))


class Distill(CheckpointStage):
    name = "distill"
    version = 1
    Config = Config

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        """Train the student in ``inp`` and write it to ``out_dir``.

        Raises UsageError (bad options, tokenizer mismatch, no CUDA), CalibrationError (text too short),
        SourceNotFoundError (no teacher), InvalidModelError.
        """
        import torch

        validate(config)
        teacher_path = Path(config.teacher).expanduser()
        if not (teacher_path / "config.json").is_file():
            raise SourceNotFoundError(f"teacher {config.teacher!r} is not a checkpoint folder: give the model the student was pruned from")
        tokenizer = same_tokenizer(inp.path, teacher_path)
        device, amp = _device(config)
        text, windows, steps = _training_windows(config, tokenizer)

        torch.manual_seed(config.seed)
        student = load_model(inp.path).to(device)
        if config.topk:
            teacher = _TopK(teacher_path, text.sha256, config, bool(tokenizer.chat_template), device, amp)
        else:
            teacher = _Live(load_model(teacher_path, amp).to(device).eval(), device, amp)
        frozen = shared_prefix(inp.path, teacher_path, student) if config.freeze_prefix else 0
        trainable = trainable_parameters(student, frozen, config.lora)
        lr = config.lr or (1e-3 if config.lora else 3e-4)
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        state = _Resume(constants.stages_dir() / f"{cache_key(self, config, inp.digest())}.resume", student, opt)
        run = _train(student, teacher, trainable, opt, state, windows, steps, lr, config, device, amp)

        if config.lora:
            merge_lora(student)
        save_checkpoint(student.eval().to("cpu"), tokenizer, out_dir, like=inp.path)
        state.clear()
        meta: dict[str, Any] = {
            "teacher": str(teacher_path),
            **run,
            "lr": lr,
            "device": str(device),
            "dtype": "bf16" if amp is not None else "float32",
            "frozen_blocks": frozen,
            "text": text.provenance(run["steps"] * config.batch * config.seq_len),
        }
        return Artifact(Kind.HF, out_dir, meta)


def _training_windows(config: Config, tokenizer):
    """(text, windows in training order, steps); raises CalibrationError when the text cannot feed ``steps``."""
    import torch

    text = calibration.load(config.text, "calibration")
    ids = calibration.token_stream(text, tokenizer, chat=bool(getattr(tokenizer, "chat_template", None)))
    available = len(ids) // config.seq_len // config.batch
    steps = config.steps or available
    if steps > available or not steps:
        need = (config.steps or 1) * config.batch * config.seq_len
        raise CalibrationError(
            f"{config.steps or 1} steps of {config.batch} x {config.seq_len} tokens need {need:,} tokens of training text "
            f"but {text.name} has {len(ids):,} (text is never repeated): use at most {available} steps, "
            "a smaller batch or seq_len, or a longer text file"
        )
    windows = torch.tensor(calibration.windows(ids, available * config.batch, config.seq_len, what="distillation"))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    return text, windows[order], steps


def _train(student, teacher, trainable, opt, state, windows, steps: int, lr: float, config: Config, device, amp) -> dict[str, Any]:
    """The training loop: resume, step until ``steps`` or the time budget, checkpoint. Returns what the manifest records."""
    import torch

    step, spent, loss_ema = state.load()
    resumed_from, stopped = step, "steps"
    student.train()
    with _progress(steps, config.time_s if not config.steps else 0.0) as bar:
        started = time.perf_counter() - spent
        last_ckpt = time.perf_counter()
        updating = False
        try:
            while step < steps:
                if config.time_s and time.perf_counter() - started >= config.time_s:
                    stopped = "time"
                    break
                first = step * config.batch
                batch = windows[first : first + config.batch].to(device)
                target = teacher(batch, range(first, first + config.batch))
                with _autocast(device, amp):
                    logits = student(input_ids=batch, use_cache=False).logits
                loss, parts = distillation_loss(logits, target, batch, config.alpha, config.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                for group in opt.param_groups:  # short linear warm-up keeps the first updates from overshooting
                    group["lr"] = lr * min(1.0, (step + 1) / 10)
                updating = True  # a Ctrl-C inside opt.step leaves weights half-updated: not worth saving
                opt.step()
                step += 1
                updating = False
                loss_ema = parts["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * parts["loss"]
                bar(step, time.perf_counter() - started, loss_ema, parts)
                if time.perf_counter() - last_ckpt >= config.checkpoint_s and step < steps:
                    state.save(step, time.perf_counter() - started, loss_ema)
                    last_ckpt = time.perf_counter()
        except KeyboardInterrupt:
            if not updating:
                state.save(step, time.perf_counter() - started, loss_ema)
            raise
    if step == 0:
        raise UsageError(f"the time budget ({config.time_s:.0f} s) ran out before the first step: give a longer `time`", option="time")
    return {
        "steps": step,
        "resumed_from": resumed_from,
        "train_s": round(time.perf_counter() - started, 1),
        "stopped_by": stopped,
        "loss": round(loss_ema, 4),
    }


def distillation_loss(student_logits, target, input_ids, alpha: float, temperature: float):
    """The loss of the module docstring, averaged over tokens; ``target`` is teacher logits or (top-k values, indices).

    Position t predicts token t + 1, so the last position has no label and is left out of both terms.
    """
    import torch
    import torch.nn.functional as F

    z_s = student_logits[:, :-1].float()
    labels = input_ids[:, 1:]
    ce = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), labels.reshape(-1))
    log_q = F.log_softmax(z_s / temperature, dim=-1)
    if isinstance(target, tuple):
        values, indices = target
        log_p = F.log_softmax(values[:, :-1].float() / temperature, dim=-1)
        log_q = torch.gather(log_q, -1, indices[:, :-1].long())
    else:
        log_p = F.log_softmax(target[:, :-1].float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return loss, {"loss": loss.item(), "ce": ce.item(), "kl": kl.item()}


def evaluate(student, teacher, windows: list[list[int]], *, device: str = "cpu") -> dict[str, float]:
    """Mean per-token KL(teacher || student) at T = 1 and the student's perplexity, over ``windows``."""
    import torch
    import torch.nn.functional as F

    kl_sum, nll_sum, n = 0.0, 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            x = torch.tensor([ids], device=device)
            z_s = student(input_ids=x, use_cache=False).logits[0, :-1].float()
            z_t = teacher(input_ids=x, use_cache=False).logits[0, :-1].float()
            log_q, log_p = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            nll_sum += float(F.nll_loss(log_q, x[0, 1:], reduction="sum"))
            n += len(ids) - 1
    return {"kld": kl_sum / n, "ppl": math.exp(nll_sum / n), "tokens": n}


def same_tokenizer(student: Path, teacher: Path):
    """The student's tokenizer, after checking the teacher's is the same; raises UsageError."""
    from transformers import AutoConfig, AutoTokenizer

    tok_s, tok_t = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    vocab_s = AutoConfig.from_pretrained(student).vocab_size
    vocab_t = AutoConfig.from_pretrained(teacher).vocab_size
    if tok_s.get_vocab() != tok_t.get_vocab() or vocab_s != vocab_t:
        raise UsageError(
            f"the teacher {teacher} and the student {student} have different tokenizers, so their logits cannot be "
            "compared: distill from the model the student was pruned from"
        )
    return tok_s


def _device(config: Config):
    """(torch device, autocast dtype or None)."""
    import torch

    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {config.device!r} asked for but torch sees no CUDA device: use device 'cpu'")
    device = torch.device(name)
    if config.dtype == "float32":
        return device, None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        # oneDNN's own check (AVX512-BF16 or AMX); without them CPU bf16 is emulated and slower than float32.
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        supported = bool(torch.backends.mkldnn.is_available() and check is not None and check())
    if config.dtype == "bf16" and not supported:
        raise UsageError(f"{device} has no bf16 support: use dtype float32")
    return device, (torch.bfloat16 if supported else None)


def _autocast(device, amp):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


# -- what trains ---------------------------------------------------------------------------------


def shared_prefix(student: Path, teacher: Path, model) -> int:
    """How many leading decoder blocks of ``student`` are bit-identical to the teacher's.

    Depth pruning leaves every block below the first dropped one untouched; their
    outputs already are what the teacher's upper blocks expect, so they stay frozen
    and the backward pass stops above them.
    """
    from safetensors import safe_open

    layers = model.base_model.layers
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    s_keys, t_keys = _tensor_files(student), _tensor_files(teacher)
    n = 0
    for i in range(len(layers)):
        mine = sorted(k for k in s_keys if k.startswith(f"{prefix}.{i}."))
        if not mine or any(k not in t_keys for k in mine):
            break
        for k in mine:
            with safe_open(s_keys[k], "pt") as fs, safe_open(t_keys[k], "pt") as ft:
                a, b = fs.get_tensor(k), ft.get_tensor(k)
            if a.shape != b.shape or a.dtype != b.dtype or not bool((a == b).all()):
                return n
        n += 1
    return n


def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update(dict.fromkeys(fh.keys(), f))
    return out


# -- resume and teacher cache ------------------------------------------------------------------


class _Resume:
    """Trainable weights, optimizer state, step and time spent, in ``<dir>/state.pt``."""

    def __init__(self, folder: Path, model, opt) -> None:
        self.path = folder / "state.pt"
        self.model, self.opt = model, opt

    def _trainable(self) -> dict:
        return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self) -> tuple[int, float, float | None]:
        import torch

        if not self.path.is_file():
            return 0, 0.0, None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                params[name].copy_(value)
        self.opt.load_state_dict(saved["opt"])
        return saved["step"], saved["spent"], saved["loss"]

    def save(self, step: int, spent: float, loss: float | None) -> None:
        import torch

        if step == 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({"trainable": self._trainable(), "opt": self.opt.state_dict(), "step": step, "spent": spent, "loss": loss}, tmp)

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.path.parent, ignore_errors=True)


class _Live:
    """The teacher run on every batch."""

    def __init__(self, model, device, amp) -> None:
        self.model, self.device, self.amp = model, device, amp

    def __call__(self, batch, _windows):
        import torch

        with torch.no_grad(), _autocast(self.device, self.amp):
            return self.model(input_ids=batch, use_cache=False).logits


class _TopK:
    """The teacher's top-k logits per training window, one file each, keyed by teacher, text, window length and k.

    The teacher is loaded only when a batch has a window not yet cached.
    """

    def __init__(self, teacher: Path, text_sha: str, config: Config, chat: bool, device, amp) -> None:
        ident = f"{Artifact(Kind.HF, teacher).digest()}|{text_sha}|{config.seq_len}|{config.topk}|{chat}|{config.seed}"
        self.dir = constants.stages_dir() / "teacher-topk" / hashlib.sha256(ident.encode()).hexdigest()[:20]
        self.path, self.k, self.device, self.amp = teacher, config.topk, device, amp
        self.live: _Live | None = None

    def __call__(self, batch, windows):
        import torch

        files = [self.dir / f"w{i:06d}.pt" for i in windows]
        if all(f.is_file() for f in files):
            loaded = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
            values = torch.stack([d["values"] for d in loaded]).to(self.device)
            indices = torch.stack([d["indices"] for d in loaded]).to(self.device)
            return values, indices
        if self.live is None:
            self.live = _Live(load_model(self.path, self.amp).to(self.device).eval(), self.device, self.amp)
        values, indices = torch.topk(self.live(batch, windows).float(), self.k, dim=-1)
        self.dir.mkdir(parents=True, exist_ok=True)
        for f, v, i in zip(files, values, indices):
            with atomic_path(f) as tmp:
                torch.save({"values": v.cpu(), "indices": i.to(torch.int32).cpu()}, tmp)
        return values, indices


def _progress(steps: int, time_s: float):
    """A rich progress bar on stderr over steps, or over seconds when ``time_s`` is given."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        by_time = bool(time_s)
        columns = [
            TextColumn("distill"),
            BarColumn(),
            TextColumn("step {task.fields[step]}/{task.fields[steps]}"),
            TextColumn("loss {task.fields[loss]} (ce {task.fields[ce]} kl {task.fields[kl]})"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task("distill", total=time_s if by_time else steps, step=0, steps=steps, loss="-", ce="-", kl="-")

            def update(step: int, elapsed: float, loss: float, parts: dict) -> None:
                progress.update(
                    task,
                    completed=min(elapsed, time_s) if by_time else step,
                    step=step,
                    loss=f"{loss:.3f}",
                    ce=f"{parts['ce']:.3f}",
                    kl=f"{parts['kl']:.4f}",
                )

            yield update

    return bar()
