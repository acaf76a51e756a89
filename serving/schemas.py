"""The body and the reply of ``POST /v1/generate``.

The request model is the annotation of the API's ``decode_request``, so LitServe has
FastAPI validate every body in the HTTP process, before the request is queued: a bad
field costs no worker time and never shares a batch with good requests. Ranges come
from :class:`genrnn.config.DecodingConfig` (one definition for the CLI, batch jobs and
HTTP); the server's own caps come from :class:`Limits`.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from genrnn.config import DecodingConfig, decoding_for_mode, fields_read
from genrnn.data import is_blank, is_unicode_text, read_length
from genrnn.errors import ConfigurationError

_DEFAULTS = DecodingConfig()

# Error type of a value over a size limit: answered with 413 rather than 422.
TOO_LARGE = "too_large"
# Problems that a reply names one by one: a body with thousands of unknown keys would
# otherwise cost seconds of the HTTP process and a reply of megabytes.
MAX_LISTED = 10


@dataclass(frozen=True)
class Limits:
    """The server's caps on one request (checked by the server's configuration)."""

    max_inputs: int = 256  # inputs in one request
    max_input_length: int = 1024  # characters in one input
    max_new_tokens: int = 256  # the engine's length cap
    max_beam_size: int = 16
    max_return_sequences: int = 16


def _out_of_range(field: str, message: str) -> PydanticCustomError:
    """A range error found on the whole body, named by its field (see serving.errors)."""
    return PydanticCustomError("out_of_range", "{field}: {message}", {"field": field, "message": message})


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate``; a field that ``mode`` does not read is ignored, whatever its value.

    Its type is still checked: ``"temperature": "hot"`` is a 422 in every mode.
    """

    # Strict: "0.8" is not a temperature. Unknown keys are refused, so a typo is not silently ignored.
    # Python's JSON parser reads Infinity and NaN, which no field takes.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    # Set once by the server before its HTTP processes start (they are forked, so they inherit it).
    limits: ClassVar[Limits] = Limits()

    inputs: list[str] = Field(description="one string, or a list of strings (kept in this order in the reply)")
    mode: Literal["greedy", "sample", "beam"] = _DEFAULTS.mode
    temperature: float = _DEFAULTS.temperature
    top_k: int = _DEFAULTS.top_k
    top_p: float = _DEFAULTS.top_p
    seed: int | None = _DEFAULTS.seed
    num_return_sequences: int = _DEFAULTS.num_return_sequences
    beam_size: int = _DEFAULTS.beam_size
    length_penalty: float = _DEFAULTS.length_penalty
    length_penalty_form: Literal["gnmt", "average"] = _DEFAULTS.length_penalty_form
    max_new_tokens: int | None = None  # None: the engine's default, bounded by the server's cap
    # The request's place in the queue (serving.tickets.Ticket), set by the server; no field of the body.
    _ticket: object = PrivateAttr(default=None)

    @property
    def ticket(self) -> object:
        return self._ticket

    @ticket.setter
    def ticket(self, ticket: object) -> None:
        self._ticket = ticket

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, body: object) -> object:
        """One error for many unknown keys, where each would otherwise have its own."""
        if isinstance(body, dict):
            unknown = [key for key in body if key not in cls.model_fields]
            if len(unknown) > MAX_LISTED:
                raise PydanticCustomError(
                    "extra_forbidden",
                    "{count} fields that no request has, such as {first}; a request's fields are {fields}",
                    {
                        "count": f"{len(unknown):,}",
                        "first": ", ".join(map(repr, unknown[:3])),
                        "fields": ", ".join(cls.model_fields),
                    },
                )
        return body

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_string_is_a_list_of_one(cls, inputs: object) -> object:
        return [inputs] if isinstance(inputs, str) else inputs

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, items: list[str]) -> list[str]:
        if not items:
            raise PydanticCustomError("empty", "must hold at least one input")
        if len(items) > cls.limits.max_inputs:
            raise PydanticCustomError(
                TOO_LARGE,
                "{count} inputs; this server takes at most {cap} per request",
                {"count": len(items), "cap": cls.limits.max_inputs},
            )
        for index, text in enumerate(items):
            if is_blank(text):  # nothing to read: the tokenizer drops white space and unseen characters
                raise PydanticCustomError(
                    "empty", "input {index} is empty, or only white space or unseen characters", {"index": index}
                )
            if not is_unicode_text(text):
                raise PydanticCustomError(
                    "not_unicode", "input {index} holds a lone surrogate (\\ud800-\\udfff), not text", {"index": index}
                )
            length = read_length(text, cls.limits.max_input_length)
            if length > cls.limits.max_input_length:
                forms = " in Unicode's compatibility forms (NFKC)" if length > len(text) else ""
                raise PydanticCustomError(
                    TOO_LARGE,
                    "input {index} has {length} characters" + forms + "; this server takes at most {cap}",
                    {"index": index, "length": length, "cap": cls.limits.max_input_length},
                )
        return items

    @model_validator(mode="after")
    def _check_decoding(self) -> "GenerateRequest":
        # Resolved here, in the HTTP process: the worker sees only the finished request.
        if self.max_new_tokens is None:
            self.max_new_tokens = min(_DEFAULTS.max_new_tokens, self.limits.max_new_tokens)
        try:
            decoding = self.decoding()
        except ConfigurationError as error:  # "field: what is wrong"
            field, _, message = str(error).partition(": ")
            raise _out_of_range(field, message) from None
        # The server's caps, on the fields the mode reads: the others are ignored.
        caps = {
            "max_new_tokens": self.limits.max_new_tokens,
            "beam_size": self.limits.max_beam_size,
            "num_return_sequences": self.limits.max_return_sequences,
        }
        for field, cap in caps.items():
            if field in fields_read(self.mode) and getattr(decoding, field) > cap:
                raise _out_of_range(field, f"must be at most {cap} on this server")
        return self

    def decoding(self) -> DecodingConfig:
        """The engine settings of every input of this request: the fields its mode reads."""
        return decoding_for_mode(self.model_dump(exclude={"inputs"}))


class ReplyCandidate(BaseModel):
    """One output sequence."""

    text: str
    tokens: list[int]
    logprob: float
    finish_reason: Literal["eos", "length"]


class ReplyOutput(BaseModel):
    """Every candidate for one input, best first."""

    input: str
    candidates: list[ReplyCandidate]


class Usage(BaseModel):
    """Tokens read and written for the whole request."""

    input_tokens: int
    output_tokens: int


class GenerateReply(BaseModel):
    """The reply of ``POST /v1/generate``; ``outputs`` keeps the order of ``inputs``."""

    model: str
    outputs: list[ReplyOutput]
    usage: Usage
