"""The serve stage: an audited engine into a Triton model repository."""
