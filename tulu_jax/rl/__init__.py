"""Reinforcement learning with verifiable rewards (RLVR): the verifiers live in ``tulu_jax.rl.verifiers``."""
