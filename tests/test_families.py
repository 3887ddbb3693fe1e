"""Every model family the README names, proven on small random checkpoints built with that family's
transformers class and its config features: full-rank conversion equals transformers' own forward,
and vLLM serves the conversion at parity with the reference; features the conversion cannot
express are refused naming the feature."""

import json

import pytest
import torch

from helpers import TINY_SOURCE, save_source
from tucker_serve.convert import ConvertOptions, convert
from tucker_serve.model import TuckerLlama
from tucker_serve.checkpoint import ModelError
from tucker_serve.families import FAMILIES as RECORDS
from tucker_serve.families import supported_family

pytestmark = pytest.mark.slow
LOGIT_TOL = 1e-4  # float32, absolute, transformers' logits against the converted reference


def family_model(name: str):
    """A random transformers model of the family, with the config feature the family is about."""
    import transformers as tf

    if name == "qwen2":  # q/k/v biases
        config = tf.Qwen2Config(**TINY_SOURCE, rope_theta=1e6, use_sliding_window=False)
        return tf.Qwen2ForCausalLM(config)
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**TINY_SOURCE, sliding_window=None))
    if name == "llama3-rope-scaling":
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
        return tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE, rope_scaling=rope))
    if name == "explicit-head-dim":  # heads x head_dim (4 x 8) != hidden_size (64)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE, head_dim=8))
    raise KeyError(name)


FAMILIES = ["qwen2", "mistral", "llama3-rope-scaling", "explicit-head-dim"]


@pytest.fixture(scope="module")
def families(smollm2, tmp_path_factory):
    """name -> (source folder, full-rank Tucker folder), built once for the module."""
    made = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = family_model(name)
        if name == "qwen2":  # random biases, so that a dropped bias would show
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.5)
        source = save_source(model, tmp_path_factory.mktemp(name) / "source", smollm2.folder)
        tucker = source.parent / "tucker"
        convert(str(source), tucker, ConvertOptions(full_rank=True, calib_text="wiki", calib_tokens=1024),
                progress=False)
        made[name] = (source, tucker)
    return made


@pytest.mark.parametrize("name", FAMILIES)
def test_full_rank_conversion_equals_transformers(families, name):
    from transformers import AutoModelForCausalLM

    source, tucker = families[name]
    ids = torch.randint(0, 49152, (2, 200), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if name == "llama3-rope-scaling":
        # transformers builds the llama3 table in float32 arithmetic (1e-7 relative off the exact
        # frequencies), which alone moves these logits by 1.3e-4 at position 200. Check our float64
        # frequencies against it, then give it the correctly rounded table.
        from tucker_serve.rope import llama_inv_freq

        exact = llama_inv_freq(model.config.head_dim, model.config.rope_parameters)
        assert torch.allclose(model.model.rotary_emb.inv_freq.double(), exact, rtol=1e-6, atol=0)
        model.model.rotary_emb.inv_freq = exact.float()
    with torch.no_grad():
        want = model(ids).logits
        got = TuckerLlama.from_pretrained(tucker)(ids)
    assert want.std() > 0.5  # logits that vary, so that equality means something
    assert (got - want).abs().max().item() <= LOGIT_TOL
    config = json.loads((tucker / "config.json").read_text())
    assert config["tucker"]["qkv_bias"] == (name == "qwen2")


@pytest.mark.vllm
@pytest.mark.parametrize("name", FAMILIES)
def test_vllm_serves_the_conversion_at_parity_with_the_reference(families, name, start_llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _, tucker = families[name]
    llm = start_llm(model=str(tucker), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=2**24,
                    max_model_len=512, max_logprobs=20, seed=0)
    g = torch.Generator().manual_seed(2)
    batch = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 37, 130)]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=20, prompt_logprobs=20, ignore_eos=True)
    reference = TuckerLlama.from_pretrained(tucker)
    worst = 0.0
    for prompt, out in zip(batch, llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params)):
        seq = prompt + list(out.outputs[0].token_ids)
        with torch.no_grad():
            ref = reference(torch.tensor([seq])).log_softmax(-1)[0]
        rows = [(p - 1, out.prompt_logprobs[p]) for p in range(1, len(prompt))]
        rows += [(len(prompt) + j - 1, d) for j, d in enumerate(out.outputs[0].logprobs)]
        for pos, lps in rows:
            ids = torch.tensor(list(lps.keys()))
            got = torch.tensor([lp.logprob for lp in lps.values()])
            worst = max(worst, (got - ref[pos, ids]).abs().max().item())
    llm.llm_engine.engine_core.shutdown()  # one engine at a time
    assert worst <= 1e-4


@pytest.mark.parametrize("model_type,bias", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_each_supported_family_is_one_record(model_type, bias):
    config = {"model_type": model_type, **TINY_SOURCE}
    family = supported_family(config, "model")
    assert family is RECORDS[model_type] and family.has_qkv_bias(config) is bias
    assert family.has_qkv_bias({**config, "attention_bias": not bias}) is (not bias)  # config.json decides first
    assert family.projections == ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "mistral", "sliding_window": 128, "max_position_embeddings": 4096},
     "sliding-window attention (window 128)"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 256, "max_window_layers": 1,
      "max_position_embeddings": 4096}, "sliding-window attention (window 256)"),
    ({"model_type": "gemma3_text", "rope_theta": 1e6, "rope_local_base_freq": 1e4},
     "two RoPE bases (rope_theta for global layers, rope_local_base_freq for local ones)"),
    ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, "QK-norm (q_norm and k_norm before RoPE)"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_features_are_refused_by_name(config, needle):
    with pytest.raises(ModelError) as err:
        supported_family(config, "model")
    assert needle in str(err.value)


def test_more_head_dims_than_hidden_size_is_refused_before_loading(tmp_path):
    # Qwen3-style widths: 4 heads x 32 > hidden 64 (the Tucker query mode cannot hold them)
    folder = tmp_path / "wide"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **TINY_SOURCE, "head_dim": 32}))
    with pytest.raises(ModelError, match="heads x head_dim > hidden_size is not supported"):
        convert(str(folder), tmp_path / "out", ConvertOptions(full_rank=True), progress=False)
    assert not (tmp_path / "out").exists()
