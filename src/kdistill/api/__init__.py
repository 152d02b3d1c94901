"""API-based distillation: a client for OpenAI-compatible teacher services with a durable cache
(client, response_cache), an OpenAI-compatible server over any local Hugging Face causal LM (server)
and a sandbox for the programs teachers write (sandbox). Importing this package does not import
torch; the server loads it with the model."""
from kdistill.api.client import Choice, Completion, Failure, TeacherAPI, TeacherRequestError, TeacherUnavailable
from kdistill.api.response_cache import ResponseCache, request_key
from kdistill.api.sandbox import SandboxResult, SandboxUnavailable, isolation_problem, run_program
from kdistill.api.server import TeacherServer, serve

__all__ = ["TeacherAPI", "Completion", "Choice", "Failure", "TeacherUnavailable", "TeacherRequestError",
           "ResponseCache", "request_key", "TeacherServer", "serve", "run_program", "SandboxResult",
           "SandboxUnavailable", "isolation_problem"]
