"""Generation at scale: one request model shared by the command line, batch runs and the served endpoint."""

from diffblocks.scale.request import GenerationRequest, RequestRunner

__all__ = ["GenerationRequest", "RequestRunner"]
