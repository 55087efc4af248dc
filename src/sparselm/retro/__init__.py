"""Retrieval-enhanced language modelling (RETRO): chunk database, neighbour search, training, evaluation, generation.

The model side (neighbour encoder, chunked cross-attention) lives in ``sparselm.model.retro``; see docs/retro.md.
"""
