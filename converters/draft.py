"""The ``draft:TYPE`` format of ``edgepack convert``: a small student of the model, for speculative decoding.

A draft earns its keep by guessing the target's next tokens, so it is made to agree with the target,
not to be a good model on its own:

1. ``prune``: keep ``draft_layers`` decoder blocks of the target's (a third by default; the least
   influential go, ``prune.py``), and optionally narrow the MLPs (``draft_intermediate_size``);
2. ``teacher-text`` (this module): the target's own greedy answers to chat prompts built from the
   calibration samples: the text a draft meets when it drafts for that target;
3. ``distill``: forward KL to the target on those answers (``alpha`` 0, ``T`` 1: the target's top
   token is the one the student learns to rank first), for ``draft_steps`` steps or ``draft_time``;
4. the GGUF stages of ``gguf:TYPE`` (``gguf_variant``) on the student.

The result goes into the bundle's ``drafts/`` and the manifest's ``drafts`` list, linked to the
``gguf:`` variants of the same convert (a draft needs one): ``edgepack.load(bundle, draft=True)``
and ``--draft model`` find it there. A format, not a flag, because a draft is made like a variant:
planned, cached, shown by ``--dry-run``, and several (``draft:q8_0,draft:Q4_K_M``) dedupe their stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..options import given, number, option
from ..plan import SOURCE, Format, Output, Planner, VariantJob
from ..stages import Artifact, Kind, Planned, Stage, side_input
from . import calibration, gguf_variant
from .distill import Config as DistillConfig
from .distill import Distill, seconds
from .prune import Config as PruneConfig
from .prune import Prune, load_model

_PANEL = "Draft model"


@dataclass(frozen=True)
class Options:
    """A ``draft:TYPE`` variant: how small the student is, what it learns from and for how long."""

    gguf: gguf_variant.Options  # the GGUF type the draft is stored in
    draft_layers: int = option(0, metavar="N", panel=_PANEL, help="Decoder blocks the draft keeps (default: a third of the model's).")
    draft_intermediate_size: int = option(0, metavar="N", panel=_PANEL, help="MLP channels the draft keeps per block, a multiple of 64 (default: all).")
    draft_prompts: int = option(256, metavar="N", panel=_PANEL, help="Chat prompts the model answers to make the draft's training text.")
    draft_tokens: int = option(128, metavar="N", panel=_PANEL, help="Tokens of each of those answers.")
    draft_steps: int = option(0, metavar="N", panel=_PANEL, help="Distillation steps (default: one pass over the answers, within --draft-time).")
    draft_time: str = option("5m", metavar="DURATION", panel=_PANEL, help="Distillation time budget, e.g. 300, 5m.")
    n_layers: int = 0  # the model's blocks, settled by ``check``


OPTIONS = ("draft_layers", "draft_intermediate_size", "draft_prompts", "draft_tokens", "draft_steps", "draft_time")


def parse(arg: str, options: Mapping[str, Any]) -> tuple[Options, set[str]]:
    """The typed options of ``draft:ARG`` (ARG a ``gguf:`` type); raises UsageError."""
    gguf, used = gguf_variant.parse(arg, options)
    fields_ = {k: number(options, k, 0) for k in ("draft_layers", "draft_intermediate_size", "draft_steps") if given(options.get(k))}
    for k in ("draft_prompts", "draft_tokens"):
        if given(options.get(k)):
            fields_[k] = number(options, k, 0)
            if fields_[k] < 1:
                raise UsageError(f"`{k}` must be at least 1", option=k)
    if any(fields_.get(k, 0) < 0 for k in ("draft_layers", "draft_intermediate_size", "draft_steps")):
        raise UsageError("`draft_layers`, `draft_intermediate_size` and `draft_steps` must be positive", option="draft_layers")
    if given(options.get("draft_time")):
        fields_["draft_time"] = str(options["draft_time"])
    if seconds(fields_.get("draft_time", "5m")) <= 0 and not fields_.get("draft_steps"):
        raise UsageError("the draft's distillation needs a bound: give `draft_steps` N or a positive `draft_time`", option="draft_time")
    return Options(gguf, **fields_), used | {k for k in OPTIONS if given(options.get(k))}


def check(opts: Options, model_dir: Path) -> Options:
    """Settle the blocks the draft keeps against the model's; raises UsageError."""
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    keep = opts.draft_layers or max(1, n // 3)
    if keep >= n:
        raise UsageError(f"`draft_layers` {keep}: the model has {n} decoder blocks, and a draft keeps fewer (e.g. {max(1, n // 3)})", option="draft_layers")
    return dataclasses.replace(opts, draft_layers=keep, n_layers=n)


def plan(opts: Options, p: Planner) -> VariantJob:
    teacher = p.model  # the model the gguf: variants are made from: the draft drafts for them
    n_drop = opts.n_layers - opts.draft_layers if opts.n_layers else 0  # 0 until ``check`` has read the model
    student = p.stage(Prune(), PruneConfig(layers=n_drop, intermediate_size=opts.draft_intermediate_size), input=teacher)
    text = p.stage(TeacherText(), TeacherText.Config(prompts=opts.draft_prompts, tokens=opts.draft_tokens), input=teacher)
    healed = p.stage(
        Distill(),
        DistillConfig(
            teacher=SOURCE if teacher is SOURCE else Output(teacher), text=Output(text), steps=opts.draft_steps,
            time_s=seconds(opts.draft_time), seq_len=TRAIN_SEQ_LEN,
        ),
        input=student,
    )  # fmt: skip
    job, describe = gguf_variant.stages(opts.gguf, p, healed)
    did = "draft-" + gguf_variant.variant_id(opts.gguf).removeprefix("gguf-")
    v = p.variant(did, job, format="gguf", backend="llama.cpp", spec=f"draft:{opts.gguf.type}", describe=describe)
    v.draft = True
    return v


TRAIN_SEQ_LEN = 128  # tokens per distillation window: about one prompt and its answer


@dataclass(frozen=True)
class TeacherTextConfig:
    prompts: int = 256  # chat prompts answered
    tokens: int = 128  # new tokens per answer (greedy)
    calibration: str = side_input("builtin")  # where the prompts' topics and passages come from
    batch: int = 16  # prompts answered at once


class TeacherText(Stage):
    """The model's greedy answers to chat prompts, one paragraph each, as a UTF-8 text file (``distill``'s ``text``)."""

    name = "teacher-text"
    version = 1
    input_kinds = (Kind.HF,)
    output_kind = Kind.FILE
    Config = TeacherTextConfig

    def plan(self, inp: Artifact | None, config: TeacherTextConfig) -> list[Planned]:
        return [Planned("answers.txt")]

    def run(self, inp: Artifact, config: TeacherTextConfig, out_dir: Path) -> Artifact:
        """Raises CalibrationError (no prompts), InvalidModelError."""
        import torch
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(inp.path, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = load_model(inp.path).eval()
        prompts = chat_prompts(calibration.load(config.calibration), config.prompts)
        chat = bool(getattr(tokenizer, "chat_template", None))
        answers = []
        with torch.inference_mode():
            for start in range(0, len(prompts), config.batch):
                part = prompts[start : start + config.batch]
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) if chat else q for q in part]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
                out = model.generate(**enc, max_new_tokens=config.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                for row in out[:, enc["input_ids"].shape[1] :]:
                    answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                    answers.append("\n".join(line for line in answer.splitlines() if line.strip()))  # one paragraph per answer
        path = out_dir / "answers.txt"
        path.write_text("\n\n".join(a for a in answers if a) + "\n", encoding="utf-8")
        return Artifact(Kind.FILE, path, {"prompts": len(prompts), "tokens": config.tokens})


_ASKS = ("Explain {topic} in Python.", "Summarize this in a few sentences:\n\n{passage}", "What is this text about?\n\n{passage}")


def chat_prompts(text: calibration.Text, n: int) -> list[str]:
    """``n`` user turns from the calibration samples: a question on a topic, or a passage to summarise or explain."""
    samples = [s for s in text.samples if s[1].strip()]
    if not samples:
        raise UsageError(f"the calibration text {text.name} has no samples to make prompts of: give another `calibration` text")
    return [_ASKS[i % len(_ASKS)].format(topic=samples[i % len(samples)][0], passage=samples[i % len(samples)][1][:600]) for i in range(n)]


FORMAT = Format("draft", parse, plan, options=(Options,), check=check)
