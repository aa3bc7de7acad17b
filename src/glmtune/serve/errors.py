"""Answers in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, which its clients turn into
their exception types."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from glmtune.serve.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("glmtune.serve")


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status, headers=error.headers)


def internal_error(error: BaseException) -> JSONResponse:
    log.error("generation failed", exc_info=error)
    return error_response(APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error"))


def client_closed() -> JSONResponse:
    """The answer to a request whose client left: nobody reads it, but the status is logged and counted."""
    return error_response(APIError(499, "the client closed the request", code="client_closed"))
