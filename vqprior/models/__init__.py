"""Models: PixelSNAIL (its layers, causal attention, heads and distributions), the VQ-VAE and its quantizer, the
null class of class-conditional models, and receptive-field maps.

Owns every ``nn.Module`` and the pure probability functions. May import only ``vqprior.config``,
``vqprior.errors`` and ``vqprior.levels``; never runtime, data, sampling, training, evaluation or compress.
"""
