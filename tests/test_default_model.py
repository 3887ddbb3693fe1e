"""Guard on the model `make serve` builds: the default conversion of the default source must stay within
+10% of the source's wiki perplexity and within 2 of its answers on the question set (greedy, served
by vLLM). A conversion change that costs the default model its quality fails here."""

import pytest

from tucker_server.launcher import DEFAULT_CONVERSION, DEFAULT_SOURCE

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_default_model_keeps_the_sources_perplexity_and_answers(converted):
    from tucker_eval.chat import chat_eval
    from tucker_serve.evaluate import evaluate

    default = str(converted(DEFAULT_CONVERSION))  # what `tucker-serve serve` converts with no options
    ppl = {spec: evaluate(spec, "wiki", tokens=4096, window=1024, progress=False)["perplexity"]
           for spec in (DEFAULT_SOURCE, default)}
    assert ppl[default] < 1.10 * ppl[DEFAULT_SOURCE], ppl
    answers = chat_eval(default, progress=False, teacher_forcing=False)
    assert answers["source"] == DEFAULT_SOURCE and answers["questions"] == 64
    assert answers["correct"] >= answers["source_correct"] - 2, (answers["correct"], answers["source_correct"])
