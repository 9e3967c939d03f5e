"""Prompt templates (jinja2 + sidecar YAML spec) for recforge's generation tasks."""

from recforge.prompts.templates import PromptSpec, PromptTemplate, list_prompts, load_prompt, render_chat

__all__ = ["PromptSpec", "PromptTemplate", "list_prompts", "load_prompt", "render_chat"]
