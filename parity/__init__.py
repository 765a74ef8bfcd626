"""Parity harness between the FMS Granite Speech implementation and Hugging Face transformers."""
