"""Corpus builders: logs and catalogues -> CPT, in-context, reading and contrastive corpora."""
