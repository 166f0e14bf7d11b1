"""Calibration and eval text gathered at run time: the held-out domains never overlap their calibration split."""

from __future__ import annotations

import inspect
import json.decoder

import pytest

from edgepack.converters import calibration
from edgepack.errors import CalibrationError


@pytest.mark.parametrize("preset", ["prose", "code"])
def test_a_domain_holds_out_whole_documents(preset):
    cal, ev = calibration.load(preset), calibration.load(preset, "eval")
    doc = (lambda topic: topic.split("#")[0].split("-")[0]) if preset == "prose" else (lambda topic: topic.split("#")[0])
    assert cal.samples and ev.samples
    assert not {doc(t) for t, _ in cal.samples} & {doc(t) for t, _ in ev.samples}  # GPL-2 and GPL-3: one side only
    assert not {b for _, b in cal.samples} & {b for _, b in ev.samples}
    assert cal.plain == {t for t, _ in cal.samples}  # prose and code are never chat formatted
    held = sum(len(b) for _, b in ev.samples) / sum(len(b) for _, b in cal.samples + ev.samples)
    assert 0.1 < held < 0.4


def test_code_leaves_docstrings_to_builtin():
    code = "\n".join(b for _, b in calibration.load("code").samples + calibration.load("code", "eval").samples)
    assert "class JSONDecoder(object):" in code
    assert inspect.getdoc(json.decoder.JSONDecoder).splitlines()[0] not in code


def test_mix_interleaves_the_domains_with_plain_prose_and_code(smollm2):
    from transformers import AutoTokenizer

    mix = calibration.load("mix")
    kinds = ["prose" if t.startswith("prose:") else "code" if t.startswith("code:") else "doc" for t, _ in mix.samples]
    assert kinds[:8] == ["doc", "prose", "doc", "code"] * 2 and len(mix.samples) == 4 * kinds.count("prose") == 4 * kinds.count("code")
    assert mix.plain == {t for t, _ in mix.samples if not t.startswith(("prose:", "code:"))} ^ {t for t, _ in mix.samples}
    formatted = calibration.format_samples(mix, AutoTokenizer.from_pretrained(smollm2), chat=True)
    for (topic, body), row in zip(mix.samples[:8], formatted):
        assert (row == body) == (topic in mix.plain) and body in row
    assert calibration.check_preset("mix") == "mix"


def test_a_machine_without_prose_says_what_to_do(monkeypatch):
    monkeypatch.setattr(calibration, "_prose_files", lambda: [])
    calibration._prose.cache_clear()
    try:
        with pytest.raises(CalibrationError, match="give a text file"):
            calibration.load("prose", "eval")
    finally:
        calibration._prose.cache_clear()


def test_eval_windows_skip_spans_of_calibration_text():
    ids = list(range(1000))
    against = [calibration.span_hashes(ids[130:280])]
    wins, skipped = calibration.disjoint_windows(ids, 3, 100, against)
    assert skipped == 2 and [w[0] for w in wins] == [0, 300, 400]  # 100-199 and 200-299 share 64-token spans with 130-279
    with pytest.raises(CalibrationError, match="free of calibration text"):
        calibration.disjoint_windows(ids, 9, 100, against)
