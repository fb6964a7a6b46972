"""Retrieval augmentation: documents -> chunks -> vectors in a store -> ranked context -> cited answers."""
