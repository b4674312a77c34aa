"""Similarity on (rows, 128) embeddings: gradients for both inputs."""

from .common import _LossBenchmark


class CosineSimilarity(_LossBenchmark):
    loss = "cosine_similarity"


class CosineEmbeddingLoss(_LossBenchmark):
    loss = "cosine_embedding_loss"
