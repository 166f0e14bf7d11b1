"""The ``teacher-text`` stage of a draft (issue 16) against what it replaced: transformers' batched ``generate``.

Both answer the same chat prompts greedily: the stage with llama.cpp on the model's f16 GGUF in ``--slots``
parallel slots, the baseline with transformers on the float checkpoint, ``--batch`` prompts at a time, padded
on the left. Prints each one's wall time; run it on an idle machine.

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/teacher_text.py CHECKPOINT MODEL-f16.gguf --prompts 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edgepack.converters import calibration
from edgepack.converters.draft import TeacherText, chat_prompts
from edgepack.stages import Artifact, Kind


def transformers_answers(ckpt: Path, prompts: list[str], tokens: int, batch: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    made = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in prompts[i : i + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            made += out.shape[0]
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("gguf", type=Path, help="the same model as an f16 GGUF (edgepack convert CHECKPOINT --to gguf:f16)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, nargs="+", default=[8])
    ap.add_argument("--batch", type=int, default=16, help="transformers' prompts per generate call")
    args = ap.parse_args()

    for n in args.slots:
        t = time.perf_counter()
        TeacherText().run(Artifact(Kind.GGUF, args.gguf, {}), TeacherText.Config(prompts=args.prompts, tokens=args.tokens, batch=n), Path(tempfile.mkdtemp()))
        print(f"llama.cpp, {n} slots: {args.prompts} answers x {args.tokens} tokens in {time.perf_counter() - t:.1f} s")
    prompts = chat_prompts(calibration.load("builtin"), args.prompts)
    t = time.perf_counter()
    transformers_answers(args.checkpoint, prompts, args.tokens, args.batch)
    print(f"transformers, batch {args.batch}: {args.prompts} answers x {args.tokens} tokens in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
