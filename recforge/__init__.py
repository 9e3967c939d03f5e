"""recforge: LLMs as domain knowledge for search, advertising and recommendation ranking."""

__version__ = "0.1.0"
