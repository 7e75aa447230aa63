"""Data: sources (files, hub names, the built-in task), tokenisation, packing, per-stage rows."""

# The label of a token that carries no loss (prompt, padding, packing gaps): Hugging Face's
# and PyTorch's ignore_index. Data writes it; the losses in raystages.stages skip it.
IGNORE = -100
