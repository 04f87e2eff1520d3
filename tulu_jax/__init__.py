"""tulu-jax: the Tülu 3 post-training recipe in pure JAX/Flax NNX."""

__version__ = "0.1.0"
