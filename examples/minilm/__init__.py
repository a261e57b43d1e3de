"""all-MiniLM-L6-v2 in Flax NNX (``model``), its offline text (``data``), and the
one-shot pruning + distillation experiment (``prune_minilm``)."""
