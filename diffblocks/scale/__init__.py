"""Generation at scale: one request model shared by the command line, batch runs and the served endpoint."""

from diffblocks.scale.batch import BatchSummary, WorkerStats, generate_batch
from diffblocks.scale.request import GenerationRequest, RequestRunner

__all__ = ["BatchSummary", "GenerationRequest", "RequestRunner", "WorkerStats", "generate_batch"]
