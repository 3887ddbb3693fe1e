"""Healing under torchrun: two CPU processes (gloo) that each train on half of every global batch
follow the loss trajectory of one process on the whole batch, and heal to the same model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_SOURCE, kl_per_token, save_source
from tucker_serve.model import TuckerLlama

BIN = Path(sys.executable).parent
HEAL = ["heal", "--steps", "6", "--batch", "4", "--seq", "64", "--chat", "0", "--text", "wiki",
        "--teacher-windows", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_tucker(smollm2, tmp_path_factory):
    import transformers as tf

    from tucker_serve.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    source = save_source(tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)), root / "source", smollm2.folder)
    convert(str(source), root / "2x", ConvertOptions(kv_ratio=2.0, calib_text="wiki", calib_tokens=1024,
                                                     calib_window=256), progress=False)
    return root / "2x"


def run(argv, cache: Path) -> None:
    env = {**os.environ, "TUCKER_SERVE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_follow_the_single_process_trajectory(tiny_tucker, tmp_path):
    cache = tmp_path / "cache"  # the first run computes the teacher pool, the second reads it back
    run([str(BIN / "tucker-serve"), *HEAL, "--model", str(tiny_tucker), "--out", str(tmp_path / "one")], cache)
    run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "tucker-serve"),
         *HEAL, "--model", str(tiny_tucker), "--out", str(tmp_path / "two")], cache)
    one, two = (json.loads((tmp_path / name / "tucker_report.json").read_text())["healing"] for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["global_steps"] == two["global_steps"] == 6
    # Same global batches; the gradients are averaged over the ranks instead of summed in one batch,
    # so the steps agree up to float rounding (bfloat16 autocast rounds each rank's matmuls alike).
    torch.testing.assert_close(torch.tensor(two["kl_per_step"]), torch.tensor(one["kl_per_step"]), rtol=1e-3, atol=1e-5)
    assert one["kl_per_step"][-1] < one["kl_per_step"][0]  # it trains
    # The weights: Adam divides each gradient by its own running scale (its first steps are about the
    # gradient's sign), so an element whose gradient is near zero can step differently in the two runs:
    # their factors lay 0.4-2.0% of healing's move apart (per tensor, measured). What such elements
    # change is what matters: the two healed models' outputs, against how far healing moved them
    # (measured: KL between the runs 4.6e-8, 1.6e-4 of the 2.8e-4 healing moved the outputs).
    start = load_file(tiny_tucker / "model.safetensors")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() == start.keys()
    moved = {k: (a[k] - start[k]).norm().item() for k in a}
    assert {k.rsplit(".", 1)[-1] for k in a if moved[k] > 0} >= {"q_core", "o_core"}  # the trained factors moved
    assert all(torch.equal(a[k], b[k]) for k in a if moved[k] == 0)  # the frozen weights are equal
    ids = torch.randint(0, TINY_SOURCE["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = {name: TuckerLlama.from_pretrained(folder)(ids).log_softmax(-1)
                for name, folder in (("start", tiny_tucker), ("one", tmp_path / "one"), ("two", tmp_path / "two"))}
    healing_moved, apart = kl_per_token(logp["start"], logp["one"]), kl_per_token(logp["one"], logp["two"])
    assert apart <= 1e-2 * healing_moved, (apart, healing_moved)
