"""Training: the generic loop (``loop.train``) and what it drives: the three tasks (pixels, priors, VQ-VAE), run
state (batch order, EMA, metrics file, stop flag), the non-finite step guard, speed switches, torchrun plumbing,
the TensorBoard mirror and learning-curve plots of run folders.

May import every other subpackage except compress; nothing in the library imports training.
"""
