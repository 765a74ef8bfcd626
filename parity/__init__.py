"""The model-agnostic parity engine: record (probes, hooks, capture) -> judge (diff, tolerances) -> render (report).

It imports neither transformers nor any model family; the glue of each family (e.g. `parity.granite`) supplies the
probe tables, the models and their inputs.
"""
