"""tucker-serve core library: Tucker attention math, conversion and evaluation (torch only, no vLLM)."""

__version__ = "0.1.0"
