"""Serving: Ray Serve applications for each stage's model, and plain transformers generation."""
