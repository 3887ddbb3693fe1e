"""Calibration statistics are computed once per process for the same model, tokens and windows: a
second conversion at another ratio reuses them and writes exactly what a fresh calibration gives."""

from dataclasses import replace
from pathlib import Path

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


def whole_model_statistics(model, ids, window):
    """The oracle: the statistics gathered by hooks on every layer's attention during ordinary
    whole-model forward passes of the windows (how calibration ran before it went layer by layer)."""
    s = calibrate.AttentionShape.from_config(model.config.to_dict())
    stats = [calibrate.LayerStats.zeros(s) for _ in model.model.layers]

    def hook(i):
        return lambda module, args, kwargs: calibrate.accumulate(stats[i], module, kwargs["hidden_states"][0].float(), s)

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for chunk in ids.split(window):
            model(chunk[None])
    for h in handles:
        h.remove()
    return stats


FIELDS = ("key_cov", "key_attn_cov", "query_energy", "value_gram", "out_gram")


def test_layer_by_layer_calibration_equals_whole_model_passes(smollm2, tmp_path):
    from tucker_serve.sources import load_hf_model

    model = load_hf_model(tiny_llama_source(tmp_path / "source", smollm2.folder))
    ids = torch.randint(0, 49152, (3 * 96,), generator=torch.Generator().manual_seed(1))
    fresh, oracle = calibrate.collect(model, ids, 96, progress=False), whole_model_statistics(model, ids, 96)
    for a, b in zip(fresh, oracle):
        assert a.tokens == b.tokens == 3 * 96
        for name in FIELDS:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-9)


def test_a_bfloat16_source_is_held_in_bfloat16_and_converts_as_its_float32_copy(smollm2, tmp_path):
    """Conversion keeps a bfloat16 source in bfloat16 (half a float32 copy's memory) and computes in
    float32 a module at a time: the files written equal those of a float32 copy of the same weights."""
    import transformers as tf

    from tucker_serve.sources import load_source

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)).to(torch.bfloat16)
    bf16 = save_source(model, tmp_path / "bf16", smollm2.folder)
    f32 = save_source(model.float(), tmp_path / "f32", smollm2.folder)
    held = load_source(bf16)
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    opt = ConvertOptions(kv_ratio=2.0, calib_text="wiki", calib_tokens=1024, calib_window=256, dtype="float32",
                         layer_widths="measured", measure_window=256, measure_windows=2)
    reports = [convert(str(src), tmp_path / f"{src.name}-2x", opt, progress=False) for src in (bf16, f32)]
    assert reports[0]["layers"] == reports[1]["layers"]  # the measured costs too: the LM head ran in float32
    a, b = (load_file(tmp_path / f"{name}-2x" / "model.safetensors") for name in ("bf16", "f32"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}  # after running, still the stored tensors

    auto = convert(str(bf16), tmp_path / "auto", ConvertOptions(kv_ratio=2.0, calib_text="wiki", calib_tokens=512,
                                                               calib_window=256), progress=False)
    written = load_file(tmp_path / "auto" / "model.safetensors")
    assert auto["dtype"] == "bfloat16" and {t.dtype for t in written.values()} == {torch.bfloat16}


def test_statistics_over_the_memory_bound_go_to_disk_and_convert_the_same(smollm2, tmp_path, monkeypatch):
    import gc

    source = str(tiny_llama_source(tmp_path / "source", smollm2.folder))
    monkeypatch.setattr(calibrate, "_kept", type(calibrate._kept)())
    opt = ConvertOptions(kv_ratio=2.0, calib_text="wiki", calib_tokens=512, calib_window=256)
    convert(source, tmp_path / "memory", opt, progress=False)
    calibrate._kept.clear()
    monkeypatch.setattr(calibrate, "IN_MEMORY_BYTES", 0)
    monkeypatch.setenv("TUCKER_SERVE_CACHE", str(tmp_path / "cache"))
    spilled = []
    collect = calibrate.collect
    monkeypatch.setattr(calibrate, "collect", lambda *a, **k: spilled.append(collect(*a, **k)) or spilled[-1])
    convert(source, tmp_path / "disk", opt, progress=False)
    assert isinstance(spilled[0], calibrate.SpilledStats) and len(spilled[0]) == 2 and not calibrate._kept
    assert sorted(p.name for p in Path(spilled[0]._dir.name).iterdir()) == ["0.pt", "1.pt"]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("memory", "disk"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spilled.clear()
    gc.collect()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []  # the folder goes with the statistics
