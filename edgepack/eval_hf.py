"""Eval's transformers model: how the float reference and GPTQ variants (which edgepack's runtime does not run) are scored."""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError, MissingDependencyError


class HFModel:
    """A transformers model scored and decoded like a runtime Session: the reference, and GPTQ variants."""

    def __init__(self, path: Path, *, device: str = "auto", threads: int | None = None, quantized: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if quantized:  # GPTQ kernels, imported as the GPTQ stage does: its CPU-worker setting, and quietly
            from .converters.gptq import import_gptqmodel

            import_gptqmodel()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # the reference in float32 whatever it was saved in; quantized kernels want their own dtype
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if quantized else torch.float32)
        except ImportError as e:  # a quantized checkpoint whose kernels are not installed
            raise MissingDependencyError("gptqmodel", extra="gptq", purpose=f"scoring {path.name} with transformers") from e
        except (OSError, ValueError) as e:
            raise BundleError(f"transformers cannot load {path} ({e}): re-pull or re-convert it") from e
        self.device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.model.to(self.device).eval()

    def chat_ids(self, prompt: str) -> list[int]:
        msgs = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def score(self, tokens: list[int], *, top_k: int):
        import torch

        from .runtime.base import Scores

        with torch.inference_mode():
            x = torch.tensor([tokens], device=self.device)
            logp = torch.log_softmax(self.model(x).logits[0, :-1].double(), dim=-1)
            nxt = torch.tensor(tokens[1:], device=self.device)
            target = logp.gather(1, nxt[:, None])[:, 0]
            vals, idx = logp.topk(top_k, dim=-1)
            rest = torch.logsumexp(logp.scatter(1, idx, float("-inf")), dim=-1)
        return Scores(target.cpu().numpy(), idx.cpu().numpy(), vals.cpu().numpy(), rest.cpu().numpy())

    def greedy(self, ids: list[int], n: int) -> str:
        import torch

        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()

    def close(self) -> None:
        self.model = None
