"""edgepack: the backends the registry imports by name, the recipes and the chat app's styles."""

from PyInstaller.utils.hooks import collect_data_files

# runtime/registry.py imports its backend modules by string, which PyInstaller's import scan cannot see
hiddenimports = ["edgepack.runtime.llamacpp", "edgepack.runtime.onnx", "edgepack.runtime.transformers"]
datas = collect_data_files("edgepack", includes=["**/*.toml", "**/*.tcss"])
