"""Converter stages, one module each: pull, calibration, prune, distill, gguf, gptq, onnx."""
