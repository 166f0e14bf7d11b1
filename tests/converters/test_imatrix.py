"""Importance matrices: llama.cpp's legacy file layout, values measured on the reference, mismatches refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from edgepack.converters.imatrix import FILENAME, Imatrix, ImatrixFile, load_reference
from edgepack.errors import CalibrationError
from edgepack.fsutil import sha256_file
from edgepack.stages import Artifact, Kind, run_stage
from models import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_file_layout_is_llama_cpp_legacy_dat(tmp_path):
    entries = {"blk.1.ffn_up.weight": np.array([1.0, 2.0], np.float32), "blk.0.attn_q.weight": np.array([0.5, 0.25, 4.0], np.float32)}
    path = tmp_path / "imatrix.dat"
    ImatrixFile(entries, chunks=4, dataset="builtin:calibration").save(path)
    data = path.read_bytes()
    # parsed by hand from the layout llama.cpp's tools/imatrix writes: sorted names, values = mean * ncall
    (n,) = struct.unpack_from("<i", data, 0)
    assert n == 2
    pos, seen = 4, []
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4 : pos + 4 + length].decode()
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        values = struct.unpack_from(f"<{nval}f", data, pos + 12 + length)
        assert ncall == 4
        assert values == pytest.approx([v * 4 for v in entries[name]])
        seen.append(name)
        pos += 12 + length + 4 * nval
    assert seen == sorted(entries)
    chunks, length = struct.unpack_from("<ii", data, pos)
    assert (chunks, data[pos + 8 :].decode()) == (4, "builtin:calibration")
    back = ImatrixFile.load(path)
    assert back.chunks == 4 and back.dataset == "builtin:calibration"
    for name, values in entries.items():
        np.testing.assert_allclose(back.entries[name], values, rtol=1e-6)


def test_reads_files_without_the_optional_trailer(tmp_path):
    raw = b"blk.0.attn_k.weight"
    body = struct.pack("<i", 1) + struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 2, 2) + struct.pack("<2f", 2.0, 6.0)
    (tmp_path / "old.dat").write_bytes(body)
    im = ImatrixFile.load(tmp_path / "old.dat")
    np.testing.assert_allclose(im.entries["blk.0.attn_k.weight"], [1.0, 3.0])
    assert im.chunks == 0


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x00", struct.pack("<ii", 1, 400) + b"blk"])
def test_corrupt_files_are_refused(tmp_path, data):
    (tmp_path / "bad.dat").write_bytes(data)
    with pytest.raises(CalibrationError, match="not a llama.cpp imatrix.dat"):
        ImatrixFile.load(tmp_path / "bad.dat")


def test_stage_measures_mean_squared_inputs_with_chat_text(tiny):
    cfg = Imatrix.Config(tokens=256, window=64)
    art, _ = run_stage(Imatrix(), Artifact(Kind.HF, tiny), cfg)
    assert art.path.name == FILENAME
    record = art.meta["calibration"]
    assert record["chat"] is True  # the tiny model carries a chat template
    assert record["tokens"] == 256 and record["windows"] == 4 and len(record["sha256"]) == 64
    im = ImatrixFile.load(art.path)
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(im.entries) == {f"blk.{i}.{k}.weight" for i in range(2) for k in kinds}  # tied head: no output entry
    assert im.chunks == 4 and im.dataset == "builtin:calibration"

    # the same means, computed another way: layer 0's attention input is its input norm applied to the embeddings
    from edgepack.converters.imatrix import calibration_windows

    model, tok, _ = load_reference(tiny)
    windows, _ = calibration_windows(tok, "builtin", 256, 64, None)
    layer = model.model.layers[0]
    with torch.no_grad():
        sq = [layer.input_layernorm(model.model.embed_tokens(torch.tensor([w])))[0].pow(2) for w in windows]
    expected = torch.cat(sq).mean(0).numpy()
    np.testing.assert_allclose(im.entries["blk.0.attn_q.weight"], expected, rtol=1e-4)
    np.testing.assert_allclose(im.entries["blk.0.attn_v.weight"], expected, rtol=1e-4)
    assert im.entries["blk.0.ffn_down.weight"].shape == (128,)


def test_check_refuses_another_models_imatrix():
    im = ImatrixFile({"blk.0.attn_q.weight": np.ones(64, np.float32)}, 1, "x")
    with pytest.raises(CalibrationError, match="has 64 values but m's tensor has 128"):
        im.check({"blk.0.attn_q.weight": 128}, model="m", required=set())
    with pytest.raises(CalibrationError, match="matches no tensor"):
        im.check({"blk.1.attn_q.weight": 64}, model="m", required=set())
    with pytest.raises(CalibrationError, match="no entry for blk.0.attn_k.weight"):
        im.check({"blk.0.attn_q.weight": 64, "blk.0.attn_k.weight": 64}, model="m", required={"blk.0.attn_k.weight"})


def test_untied_head_gets_an_entry(tmp_path):
    hf = tiny_model("llama", tmp_path / "m", tie_word_embeddings=False)
    art = Imatrix().run(Artifact(Kind.HF, hf), Imatrix.Config(tokens=128, window=64, chat=False), tmp_path / "out")
    im = ImatrixFile.load(art.path)
    assert im.entries["output.weight"].shape == (64,)
    assert art.meta["calibration"]["chat"] is False
    assert (im.entries["output.weight"] > 0).all()


def test_files_a_stage_reads_key_its_cache_by_content(tmp_path, logged):
    """A calibration file or an imatrix file edited in place makes the stages that read it run again; unchanged, they are reused."""
    from edgepack.convert import convert

    hf = tiny_model("llama", tmp_path / "m")
    notes = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {i} talks about topic {i * 7 % 13}, " + "with words about tensors and caches. " * 6 for i in range(40)]
    notes.write_text("\n\n".join(paragraphs))
    options = {"calibration": str(notes), "calibration_tokens": "512"}

    def stages(**opts) -> dict[str, bool]:
        logged.clear()
        convert(str(hf), "gguf:Q4_K_M", tmp_path / "b", options={**options, **opts})
        return {ln.split(":")[0]: ln.endswith("cached") for ln in logged.messages if ln.split(":")[0] in ("imatrix", "quantize")}

    assert stages() == {"imatrix": False, "quantize": False}
    assert stages() == {"imatrix": True, "quantize": True}
    notes.write_text("\n\n".join(reversed(paragraphs)))  # same name, same size, other content
    assert stages() == {"imatrix": False, "quantize": False}
    assert stages() == {"imatrix": True, "quantize": True}

    # the user's own imatrix file: quantize reruns when it changes in place
    user = tmp_path / "mine.dat"
    computed = tmp_path / "b" / "calibration" / FILENAME
    user.write_bytes(computed.read_bytes())
    assert stages(imatrix=str(user)) == {"quantize": False}
    assert stages(imatrix=str(user)) == {"quantize": True}
    im = ImatrixFile.load(user)
    ImatrixFile({k: v * 2 for k, v in im.entries.items()}, im.chunks, im.dataset).save(user)
    assert stages(imatrix=str(user)) == {"quantize": False}
    step = [s for s in json.loads((tmp_path / "b" / "edgepack.json").read_text())["steps"] if s["stage"] == "quantize"][-1]
    assert step["params"]["imatrix"] == {"name": "mine.dat", "sha256": sha256_file(user)}  # no machine path in the manifest
