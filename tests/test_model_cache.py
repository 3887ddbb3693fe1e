"""The one home of cached conversions: folder names say what a folder holds, and a built model is reused
only when it was converted with the same options."""

import pytest

from tucker_serve.convert import ConvertOptions
import json

from tucker_serve.options import options_record
from tucker_serve.model_cache import at_ratio, at_spec, built_with_other_options, tucker_model, tucker_name


def test_names_carry_ratio_options_and_healing():
    assert tucker_name("src", ConvertOptions(kv_ratio=1.2)) == "src-tucker-1.2x"  # serve's cache names stay
    assert tucker_name("src", ConvertOptions(kv_ratio=2.0), heal_minutes=30) == "src-tucker-2x-healed30m"
    assert tucker_name("src", at_ratio(1)) == "src-tucker-full"
    assert tucker_name("src", ConvertOptions(key_rank=96, value_rank=160)) == "src-tucker-k96-v160"
    wiki = tucker_name("src", ConvertOptions(kv_ratio=1.5, calib_text="wiki"))
    longer = tucker_name("src", ConvertOptions(kv_ratio=1.5, calib_tokens=32768))
    assert wiki.startswith("src-tucker-1.5x-") and len({wiki, longer, "src-tucker-1.5x"}) == 3


def test_benchmark_rows_name_ratio_widths_and_any_convert_option():
    assert at_spec("full") == ConvertOptions(full_rank=True) and at_spec("1.5") == ConvertOptions(kv_ratio=1.5)
    assert at_spec("2@measured") == ConvertOptions(kv_ratio=2.0, layer_widths="measured")
    assert at_spec("2@measured+copy_window=0+calib_text=wiki") == ConvertOptions(
        kv_ratio=2.0, layer_widths="measured", copy_window=0, calib_text="wiki")
    for bad in ("2+copy_window", "2+nonsense=1"):
        with pytest.raises(ValueError, match="is not OPTION=VALUE of a convert option"):
            at_spec(bad)


def test_a_folder_built_under_another_default_is_not_reused(tmp_path):
    opt = ConvertOptions(kv_ratio=1.2)
    folder = tmp_path / tucker_name("src", opt)
    assert built_with_other_options(folder, opt) == ""  # nothing built yet
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tucker_report.json").write_text(json.dumps({"source": "src"}))  # written before options were recorded
    assert built_with_other_options(folder, opt) == "its report does not record them"
    older = options_record(opt) | {"calib_window": 512}  # the same name, built when the default window was 512
    (folder / "tucker_report.json").write_text(json.dumps({"options": older}))
    assert tucker_name("src", opt) == folder.name
    assert built_with_other_options(folder, opt) == "calib_window: 512 -> 4096"
    (folder / "tucker_report.json").write_text(json.dumps({"options": options_record(opt)}))
    assert built_with_other_options(folder, opt) is None


def test_a_model_healed_under_another_recipe_is_not_reused(tmp_path):
    from dataclasses import asdict

    from tucker_serve.heal import HealOptions, healing_record

    opt, healing = ConvertOptions(kv_ratio=2.0), HealOptions(minutes=30, eval_tokens=0)
    folder = tmp_path / tucker_name("src", opt, heal_minutes=30)
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    recorded = healing_record(healing)
    older = {k: v for k, v in recorded.items() if k != "teacher_windows"}  # healed before the option existed
    (folder / "tucker_report.json").write_text(json.dumps({"options": options_record(opt), "healing": older}))
    assert built_with_other_options(folder, opt, healing) == "healing teacher_windows: None -> 0"
    (folder / "tucker_report.json").write_text(json.dumps({"options": options_record(opt), "healing": recorded}))
    assert built_with_other_options(folder, opt, healing) is None
    assert set(recorded) == set(asdict(healing)) - {"source"}


@pytest.mark.slow
def test_a_built_model_is_reused_not_rebuilt(converted):
    folder = converted(2.0)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    again = tucker_model("smollm2-135m", at_ratio(2.0), root=folder.parent, progress=False)
    assert again == folder and (again / "model.safetensors").stat().st_mtime_ns == before


def test_a_benchmark_row_names_its_model_and_cache():
    from tucker_serve.model_cache import row_spec

    assert row_spec("source") == ("source", "auto")
    assert row_spec("source/fp8") == ("source", "fp8")
    assert row_spec("1.2@measured+measure_window=512/auto") == ("1.2@measured+measure_window=512", "auto")
    assert row_spec("runs/x1.5-h10/fp8") == ("runs/x1.5-h10", "fp8")
    # a folder without its cache would read its last part as the cache: refused, naming the fix
    with pytest.raises(ValueError, match="runs/x1.5-h10/auto"):
        row_spec("runs/x1.5-h10")
    with pytest.raises(ValueError, match="CACHE one of auto"):
        row_spec("source/")
