"""The LitServe API: HTTP requests in, one engine call per batch, replies out.

The four LitServe hooks and nothing more: ``setup`` loads the bundle on the device
LitServe hands over, ``decode_request`` receives bodies already validated in the
HTTP process, ``predict`` flattens a batch of requests into one
:meth:`genrnn.decoding.Generator.generate` call (one ``DecodingConfig`` per input, so
modes may mix) and splits the result back, ``encode_response`` returns the reply.

This module must not use ``from __future__ import annotations``: LitServe reads the
annotation of ``decode_request`` at run time to have FastAPI validate the body.
"""

import logging
import time
from dataclasses import dataclass

import litserve as ls
import torch
from fastapi.responses import JSONResponse

import genrnn
from genrnn.bundle import load_bundle
from genrnn.config import DEFAULT_AVERAGING, Averaging
from genrnn.decoding import Generation, Generator, settings_per_source
from serving import metrics
from serving.loop import InputBudgetLoop
from serving.schemas import GenerateReply, GenerateRequest, Limits, ReplyCandidate, ReplyOutput, Usage

logger = logging.getLogger(__name__)

GENERATE_PATH = "/v1/generate"


@dataclass
class Failure:
    """A request of a batch that could not be decoded; the others still get their replies."""

    detail: str


def reply_from(model: str, generations: list[Generation]) -> GenerateReply:
    """The HTTP reply for the generations of one request's inputs."""
    outputs = [
        ReplyOutput(input=g.input, candidates=[ReplyCandidate(**c.to_dict()) for c in g.candidates])
        for g in generations
    ]
    usage = Usage(
        input_tokens=sum(g.input_tokens for g in generations),
        output_tokens=sum(len(c.tokens) for g in generations for c in g.candidates),
    )
    return GenerateReply(model=model, outputs=outputs, usage=usage)


class GenerationAPI(ls.LitAPI):
    """``POST /v1/generate`` over a bundle, with dynamic batching across requests."""

    def __init__(
        self,
        bundle: str,
        limits: Limits,
        max_batch_size: int,
        batch_timeout: float,
        averaging: Averaging = DEFAULT_AVERAGING,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            api_path=GENERATE_PATH,
            loop=InputBudgetLoop(),
        )
        self.bundle = bundle
        self.averaging = averaging  # of an ensemble's members
        self.limits = limits

    def setup(self, device: str) -> None:
        """Load the bundle on ``device`` (runs once in each inference worker)."""
        bundle = load_bundle(self.bundle, device, self.averaging)
        self.model_name = bundle.name
        self.generator = Generator(
            bundle.model,
            bundle.source_tokenizer,
            bundle.target_tokenizer,
            max_new_tokens_cap=self.limits.max_new_tokens,
        )
        if isinstance(self.loop, InputBudgetLoop):  # each decoder step shows the worker is moving
            self.generator.on_step = self.loop.moved
        metrics.MODEL_INFO.labels(bundle.name, genrnn.__version__, str(device)).set(1)

    def decode_request(self, request: GenerateRequest) -> GenerateRequest:
        """The body, validated by FastAPI in the HTTP process before it was queued."""
        return request

    def predict(self, requests: list[GenerateRequest]) -> list[GenerateReply | Failure]:
        """Decode every input of every request as one engine batch; a failing request fails alone."""
        try:
            return self._generate(requests)
        except Exception:
            if len(requests) == 1:
                return [self._failure(requests[0])]
            logger.exception("a batch of %d requests failed; decoding them one at a time", len(requests))
        # Out of the except block: its traceback held the failed batch's tensors until here.
        if self.generator.device.type == "cuda":
            torch.cuda.empty_cache()
        return [self._generate_alone(r) for r in requests]

    def encode_response(self, output: GenerateReply | Failure) -> GenerateReply:
        """The reply; a failed request gets a 500 of its own (FastAPI passes a Response through as is)."""
        if isinstance(output, Failure):
            return JSONResponse({"detail": output.detail}, status_code=500)
        return output

    def _generate(self, requests: list[GenerateRequest]) -> list[GenerateReply]:
        sources = [text for r in requests for text in r.inputs]
        settings = [setting for r in requests for setting in settings_per_source(r.decoding(), len(r.inputs))]
        metrics.BATCH_SIZE.observe(len(sources))  # each engine call, the failed batch and its retries apart
        started = time.perf_counter()
        generations = self.generator.generate(sources, settings)
        seconds = time.perf_counter() - started
        replies, start = [], 0
        for request in requests:
            replies.append(reply_from(self.model_name, generations[start : start + len(request.inputs)]))
            start += len(request.inputs)
        # Counted once every reply is made: a batch that fails here is decoded again one request at a time.
        for request, reply in zip(requests, replies):
            metrics.INPUT_TOKENS.labels(request.mode).inc(reply.usage.input_tokens)
            metrics.OUTPUT_TOKENS.labels(request.mode).inc(reply.usage.output_tokens)
            metrics.TIME_PER_OUTPUT_TOKEN.labels(request.mode).observe(seconds / max(1, reply.usage.output_tokens))
        return replies

    def _generate_alone(self, request: GenerateRequest) -> GenerateReply | Failure:
        try:
            return self._generate([request])[0]
        except Exception:
            return self._failure(request)

    def _failure(self, request: GenerateRequest) -> Failure:
        logger.exception("decoding failed for a request with %d inputs", len(request.inputs))
        return Failure("decoding failed inside the server; the error is in the server's log")
