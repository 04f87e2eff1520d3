"""Training stages (SFT, DPO, RLVR) built from shared pieces: `sections` (config),
`setup` (mesh, tokenizer, model, state), `run_dir` (run directory, loop, export).

Stage modules are imported by name (`tulu_jax.stages.sft`), so that importing one stage does not load the others.
"""
