"""llama-cpp-python: libllama and the ggml libraries sit in llama_cpp/lib and are opened with ctypes by path."""

from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp")
