"""Contrastive alignment into text-embedding models, catalogue embedding, retrieval and CTR evaluation."""
