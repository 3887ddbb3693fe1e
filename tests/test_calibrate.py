"""Calibration statistics are computed once per process for the same model, tokens and windows: a
second conversion at another ratio reuses them and writes exactly what a fresh calibration gives."""

from dataclasses import replace

import torch
from safetensors.torch import load_file

from helpers import TINY_SOURCE, save_source
from tucker_serve import calibrate
from tucker_serve.convert import ConvertOptions, convert


def tiny_llama_source(folder, tokenizer_from):
    """A random 2-layer transformers Llama."""
    import transformers as tf

    torch.manual_seed(0)
    return save_source(tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)), folder, tokenizer_from)


def test_a_second_conversion_of_the_same_calibration_reuses_its_statistics(smollm2, tmp_path, monkeypatch):
    source = str(tiny_llama_source(tmp_path / "source", smollm2.folder))
    runs = []
    collect = calibrate.collect
    monkeypatch.setattr(calibrate, "collect", lambda *a, **k: runs.append(a[2]) or collect(*a, **k))
    monkeypatch.setattr(calibrate, "_kept", type(calibrate._kept)())  # this test's own memory
    opt = ConvertOptions(kv_ratio=2.0, calib_text="wiki", calib_tokens=1024, calib_window=256)

    convert(source, tmp_path / "2x", opt, progress=False)
    convert(source, tmp_path / "1.5x", replace(opt, kv_ratio=1.5), progress=False)
    assert runs == [256]  # one calibration for both ratios
    convert(source, tmp_path / "short", replace(opt, calib_window=128), progress=False)
    assert runs == [256, 128]  # other windows: calibrated again

    calibrate._kept.clear()
    convert(source, tmp_path / "2x-fresh", opt, progress=False)
    assert runs == [256, 128, 256]
    kept, fresh = load_file(tmp_path / "2x" / "model.safetensors"), load_file(tmp_path / "2x-fresh" / "model.safetensors")
    assert kept.keys() == fresh.keys() and all(torch.equal(kept[k], fresh[k]) for k in kept)


def test_statistics_over_the_memory_bound_are_not_kept(smollm2, tmp_path, monkeypatch):
    source = str(tiny_llama_source(tmp_path / "source", smollm2.folder))
    monkeypatch.setattr(calibrate, "_kept", type(calibrate._kept)())
    monkeypatch.setattr(calibrate, "KEPT_BYTES", 1000)  # a tiny model's statistics are about 100 kB
    convert(source, tmp_path / "2x", ConvertOptions(kv_ratio=2.0, calib_text="wiki", calib_tokens=512,
                                                     calib_window=256), progress=False)
    assert len(calibrate._kept) == 0
