"""Checkpoint formats of other codebases: Hugging Face Huginn."""
