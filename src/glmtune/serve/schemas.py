"""The requests and answers of OpenAI's chat completions and (legacy) text completions APIs, as far as glmtune serves
them.

Requests are validated strictly, as OpenAI validates them: a string where a number belongs is refused, not coerced,
and a field OpenAI does not know is refused ("Unrecognized request argument supplied", OpenAI's own 400), in a
message too. OpenAI's fields that glmtune does not implement are type-checked like the others, then: those that only
label a request (`user`, `metadata`, `store`, ...) are ignored; those that would change the answer (penalties,
`response_format` for JSON, `echo`, ...) are refused unless given their neutral value (what their absence
means), since answering as if they were absent would mislead the client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object's text


class ToolCallItem(BaseModel):
    """A call an assistant made: in a request's history, and in an answer's message."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # "developer" is OpenAI's newer name for "system"; "tool" is a tool's result (an observation turn).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # an assistant's thinking, as glmtune (and vLLM) answer it
    tool_calls: list[ToolCallItem] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result's: the call it answers
    name: str | None = None  # OpenAI's participant name: accepted, not rendered
    refusal: str | None = None  # an OpenAI assistant's refusal: accepted, not rendered


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)  # at most the server's --max_messages
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)  # at most the server's --max_tokens_limit
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    # OpenAI's limits: up to 4 stop sequences, 128 choices, 128 tools; a seed is a 64-bit integer.
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    n: int | None = Field(None, ge=1, le=128)  # at most the server's --max_n
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)  # checked by the server: {"type": "function", ...}
    tool_choice: str | dict[str, Any] | None = None  # "auto" and "none" are served
    chat_template_kwargs: dict[str, Any] | None = None  # {"enable_thinking": bool}, as vLLM takes it
    # Refused unless given their neutral value (UNSERVED).
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs true
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # Labels, accepted and ignored.
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unserved(self) -> str | None:
        """The first field given a value this server does not serve, or None."""
        return first_unserved(self, UNSERVED)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_asked(self) -> int | None:
        """How many most likely tokens to report per token; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


# Each field glmtune does not serve -> its neutral value, the one accepted (None: no value is).
UNSERVED: dict[str, Any] = {"functions": None, "function_call": None,
                            "response_format": {"type": "text"}, "reasoning_effort": None, "audio": None,
                            "modalities": ["text"], "prediction": None, "web_search_options": None,
                            "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}


def first_unserved(request: BaseModel, unserved: dict[str, Any]) -> str | None:
    for name, neutral in unserved.items():
        value = getattr(request, name)
        if value is not None and value != neutral:
            return name
    return None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(BaseModel):
    """OpenAI's legacy text completion: the prompt is text (or token ids) continued as it is, no chat template."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    # OpenAI's four forms: a text, texts, token ids, lists of token ids. Several prompts answer n choices each.
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)  # None: OpenAI's default for completions, 16
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy form: how many most likely tokens per token
    # Refused unless given their neutral value (COMPLETION_UNSERVED).
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=20)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # Labels, accepted and ignored.
    user: str | None = None

    def unserved(self) -> str | None:
        if self.best_of is not None and self.best_of != (self.n or 1):  # best_of == n: every candidate is returned
            return "best_of"
        return first_unserved(self, COMPLETION_UNSERVED)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


COMPLETION_UNSERVED: dict[str, Any] = {"echo": False, "suffix": None, "frequency_penalty": 0, "presence_penalty": 0,
                                       "logit_bias": {}}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is tool calls alone
    reasoning_content: str | None = None
    tool_calls: list[ToolCallItem] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprobItem(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobItem] | None  # every generated token (reasoning and tool-call tokens included)
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class StreamedToolCall(ToolCallItem):
    index: int  # which of the choice's calls


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[StreamedToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the last chunk, when stream_options.include_usage asks for it


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class TextCompletion(BaseModel):
    """A text completion, and (as OpenAI streams it) each of its chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # a chunk's only in the last, when stream_options.include_usage asks for it


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glmtune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def sse_data(payload: str) -> str:
    """One server-sent event, as OpenAI streams answers."""
    return f"data: {payload}\n\n"
