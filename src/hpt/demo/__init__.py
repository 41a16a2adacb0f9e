"""The embedded default: a tiny model and tokenizer built offline, and a synthetic task.

- :mod:`hpt.demo.tiny`: a ChatML byte-level BPE tokenizer and a small random Qwen2 (``build_tiny``),
  and ``load_smollm2`` for a real small instruct model from a local GGUF file.
- :mod:`hpt.demo.task`: addition word problems of graded difficulty with worked solutions.
"""
