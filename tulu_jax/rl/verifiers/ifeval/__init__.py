"""IFEval: the 25 official instructions (strict and loose modes) and Tülu 3's JSON constraints."""

from tulu_jax.rl.verifiers.ifeval.evaluation import follow_instructions, loose_variants, parse_ground_truth, score

__all__ = ["follow_instructions", "loose_variants", "parse_ground_truth", "score"]
