"""Every FMS architecture against its Hugging Face class on the parity engine (`fms-parity`): tiny seeded configs
(`configs`), both sides built through FMS's own HF loading path (`build`), the probe table derived from FMS's
checkpoint adapter (`derive`), the inputs (`cases`), the sections (`run`), the command line (`cli`) and the
all-architectures table (`sweep`). Glue like `parity/granite/`: the engine in `parity/` knows nothing of it."""
