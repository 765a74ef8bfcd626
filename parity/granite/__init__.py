"""The Granite Speech glue: the only place where the generic engine (`parity`), the FMS model family
(`granite_speech`) and the HF reference (`transformers`) meet. Probe tables, HF reference loading, inputs, the
`compare` CLI, the pytest plugin, the fault catalogue and the fixture builders with their data."""
