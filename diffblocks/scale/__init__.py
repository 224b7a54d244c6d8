"""Generation at scale: one request model shared by the command line, batch runs and the served endpoint."""

from diffblocks.scale.batch import BatchSummary, WorkerStats, generate_batch
from diffblocks.scale.request import GenerationRequest, RequestRunner
from diffblocks.scale.serve import Server, ServeOptions, serve  # imports Ray only when serve() is called

__all__ = [
    "BatchSummary",
    "GenerationRequest",
    "RequestRunner",
    "ServeOptions",
    "Server",
    "WorkerStats",
    "generate_batch",
    "serve",
]
