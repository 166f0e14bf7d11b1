"""onnxruntime-genai: its extension loads libonnxruntime-genai and onnxruntime's library beside it at run time."""

from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("onnxruntime_genai") + collect_dynamic_libs("onnxruntime")
