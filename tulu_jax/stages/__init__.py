"""Training stages (SFT, DPO, RLVR) built from the shared runner pieces in `tulu_jax.stages.common`.

Stage modules are imported by name (`tulu_jax.stages.sft`), so that importing one stage does not load the others.
"""
