"""A tiny bfloat16 Llama source that needs nothing set-up downloads, for the device checks (a GPU
machine may have neither SmolLM2 nor the built-in texts): a word-level tokenizer and a text file of
its words, from `tokenizers` alone. Used by tests/test_gpu.py and bench/gpu_serve_defaults.py."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = 2000


def offline_source(root: Path, config: dict) -> tuple[Path, Path]:
    """Write root/source (a transformers LlamaForCausalLM of `config`, bfloat16, seed 0, with the
    tokenizer) and root/text.txt (60,000 random words of the tokenizer's); return both paths."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(WORDS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(root / "source")
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(root / "source")
    picks = torch.randint(0, len(words), (60000,), generator=torch.Generator().manual_seed(1)).tolist()
    (root / "text.txt").write_text(" ".join(words[i] for i in picks))
    return root / "source", root / "text.txt"
