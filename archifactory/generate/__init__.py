"""Generation (`sampling`: exact batched decoding with each mixin's explicit state) and export of a run to
the Hugging Face format (`export`)."""

from archifactory.generate.sampling import generate

__all__ = ["generate"]
