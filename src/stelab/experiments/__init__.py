"""Experiments: one module per reproduced paper (each exposes ``run(out_dir, ...)``)."""
