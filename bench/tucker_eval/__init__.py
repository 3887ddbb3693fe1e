"""Quality as the model is served: `tucker-serve eval --chat` (`chat`) and the vLLM engine it and the
benchmarks measure through (`engine`: started as `tucker-serve serve` starts it; perplexity from
prompt log-probs, greedy answers, teacher-forced agreement). Benchmarks (`tucker_bench`) read this
package; it reads none of theirs."""
