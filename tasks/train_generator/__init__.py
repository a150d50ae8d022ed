"""The train-generator stage: MaskGIT or DiT trained on a pretokenize token table."""
