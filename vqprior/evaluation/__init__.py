"""Evaluation: held-out likelihood in bits/dim or bits/code, and reconstruction metrics.

May import models, data, runtime and the top-level modules; never sampling, training or compress.
"""
