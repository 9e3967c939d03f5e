"""Jinja2 prompt templates, one per generation task, with their specs."""
