"""Reinforcement learning with verifiable rewards (RLVR): verifiers in ``tulu_jax.rl.verifiers``, reward shaping in
``tulu_jax.rl.rewards``."""
