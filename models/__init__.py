"""Pure PyTorch models of tok1d: tokenizers, quantizers, generators, diffusion, losses, metrics."""
