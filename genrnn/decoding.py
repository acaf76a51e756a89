"""The decoding engine: greedy, sampled and beam decoding over one encoder pass.

Every consumer (HTTP server, batch jobs, evaluation) calls :class:`Generator`.
A batch may mix modes and settings: each row carries its own temperature, top-k,
top-p, length cap and random stream as tensors, so a step is a handful of tensor
operations whatever the mix. Rows that finish leave the active batch (compaction),
so one long output does not make every short one pay.

Sampling draws its uniform numbers from a counter-based hash of (row key, step),
not from a shared generator: a seeded request gets the same output whatever else
shares its batch.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from genrnn.config import DecodingConfig
from genrnn.data import pad
from genrnn.model import ONEDNN_MIN_ROWS, Seq2Seq, State
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

_MASK32 = 0xFFFFFFFF
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy decoding


@dataclass
class Candidate:
    """One output sequence."""

    tokens: list[int]  # without BOS/EOS
    text: str
    logprob: float  # total log-probability under the model, EOS included when emitted
    finish_reason: str  # "eos" or "length"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """Every requested candidate for one input, best first."""

    input: str
    input_tokens: int
    candidates: list[Candidate]


@dataclass
class _Hypothesis:
    tokens: list[int]
    logprob: float
    finish_reason: str


# -- sampling primitives ----------------------------------------------------------------------


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def wide_dtype(device: torch.device) -> torch.dtype:
    """What sums of log-probabilities and sampling's cumulative sums are kept in: float64, but
    float32 on Apple's MPS, which has no float64 (24-bit uniforms are exact in either)."""
    return torch.float32 if device.type == "mps" else torch.float64


def counter_uniform(keys: torch.Tensor, step: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) from row keys ``(rows, 2)`` (32-bit halves) and a step counter."""
    mixed = _mix32(keys[:, 0] ^ _mix32((keys[:, 1] + step * 0x9E3779B9) & _MASK32))
    return (mixed >> 8).to(wide_dtype(keys.device)) * 2.0**-24


def row_key(seed: int, candidate: int) -> tuple[int, int]:
    """The random stream of candidate ``candidate`` of a request seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{candidate}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:], "big")


def item_seed(seed: int, item_id: int | str) -> int:
    """The seed of one item of many decoded under one seed: a hash of the seed and the item's id.

    Each item then samples from a stream of its own, whatever batch it lands in.
    """
    digest = hashlib.blake2b(f"{seed}:{json.dumps(item_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a non-negative int64


def settings_per_source(settings: DecodingConfig, count: int) -> list[DecodingConfig]:
    """The settings of ``count`` sources decoded together under ``settings``.

    With a seed, each source samples from a stream of its own, derived from the seed and
    its position: under one seed they would all draw the same numbers, and copies of a
    source would come out alike.
    """
    if settings.seed is None:
        return [settings] * count
    return [replace(settings, seed=item_seed(settings.seed, i)) for i in range(count)]


def filtered_distribution(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature, top-k and top-p (nucleus) filtering.

    Returns probabilities sorted in descending order ``(rows, vocab)`` (zero outside
    the kept set, renormalised) and the token id at each sorted position. Top-k
    (with the tokens tied with the k-th) comes first; top-p then keeps the smallest
    prefix of what top-k left, renormalised, whose mass reaches ``p`` (the order of
    Hugging Face's and TGI's samplers).
    ``top_k == 0`` and ``top_p == 1`` switch the filters off.
    """
    scaled = logits / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    # Top-k keeps every token tied with the k-th, as Hugging Face's does: none goes for its id alone.
    kth = sorted_logits.gather(1, (top_k.clamp(1, probs.shape[-1]) - 1)[:, None])
    probs = probs * ((top_k[:, None] == 0) | (sorted_logits >= kth))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True  # the likeliest token always: a p under float32's smallest number rounds to 0
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True), order


def sample_from(probs: torch.Tensor, order: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token id per row from sorted ``probs`` and a uniform per row."""
    cdf = probs.to(wide_dtype(probs.device)).cumsum(dim=-1)
    position = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    position = position.clamp_(max=probs.shape[-1] - 1)
    return order.gather(1, position).squeeze(1)


def length_penalty(length: torch.Tensor, alpha: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    """Divisor of a hypothesis's log-probability: GNMT's ``((5 + len) / 6) ** alpha`` or ``len``."""
    length = length.to(torch.float32)
    return torch.where(average, length, ((5.0 + length) / 6.0) ** alpha)


def _check_not_one_string(sources: Sequence[str]) -> None:
    """A string is a sequence of strings too: each of its characters would be decoded as a source."""
    if isinstance(sources, str):
        raise TypeError(f"sources: a list of strings, and this is one string; decode it as [{sources[:20]!r}]")


def still_running(finished: torch.Tensor, ended: int) -> torch.Tensor:
    """The indices of the rows not ``finished``, in order, given how many did (``ended``, known on the host).

    A stable sort puts them first: unlike ``nonzero``, it needs no wait for the device to learn how many.
    """
    return torch.argsort(finished.to(torch.uint8), stable=True)[: finished.numel() - ended]


def _select_rows(state: State, index: torch.Tensor) -> State:
    return tuple(s.index_select(1, index) for s in state)


def trace_back(
    step_tokens: Sequence[torch.Tensor],
    step_parents: Sequence[torch.Tensor],
    last_step: torch.Tensor,
    last_token: torch.Tensor,
    parent: torch.Tensor,
) -> torch.Tensor:
    """Token sequences ``(requests, hyps, steps)`` of beam hypotheses, from back-pointers.

    ``step_tokens[t]`` and ``step_parents[t]`` hold, for every request and live beam slot
    after step ``t``, its token and the slot it extended at step ``t - 1``. A hypothesis
    ends at ``last_step`` with ``last_token``, extending slot ``parent``; positions after
    its end are PAD.
    """
    out = torch.full((*last_step.shape, max(len(step_tokens), 1)), PAD_ID, dtype=torch.long, device=last_step.device)
    slot = parent.clone()
    for t in reversed(range(len(step_tokens))):
        ends_here, earlier = last_step == t, last_step > t
        out[:, :, t] = torch.where(ends_here, last_token, step_tokens[t].gather(1, slot).masked_fill(~earlier, PAD_ID))
        slot = torch.where(ends_here, parent, torch.where(earlier, step_parents[t].gather(1, slot), slot))
    return out


class _KernelSwitch:
    """The process-wide oneDNN switch, shared by the threads that decode at once.

    The setting found when the first of them came in is put back when the last leaves:
    each restoring what it found would leave it off for good whenever two overlap (the
    second finds the first's "off"). While they overlap the last to come in sets it,
    which changes the speed and the last bits of a result, never its tokens' meaning.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.found = True

    @contextmanager
    def rows(self, rows: int) -> Iterator[None]:
        """Run recurrent layers on oneDNN only for batches of at least ``ONEDNN_MIN_ROWS`` rows."""
        with self.lock:
            if self.inside == 0:
                self.found = torch.backends.mkldnn.enabled
            self.inside += 1
            torch.backends.mkldnn.enabled = self.found and rows >= ONEDNN_MIN_ROWS
        try:
            yield
        finally:
            with self.lock:
                self.inside -= 1
                if self.inside == 0:
                    torch.backends.mkldnn.enabled = self.found


_recurrent_kernel = _KernelSwitch().rows


# -- the engine ---------------------------------------------------------------------------------


class Generator:
    """Decodes batches of sources with per-row settings on whatever device the model is on."""

    def __init__(
        self,
        model: Seq2Seq,
        source_tokenizer: Tokenizer,
        target_tokenizer: Tokenizer,
        max_new_tokens_cap: int = 256,
        seed: int | None = None,
        compact: bool = True,
    ) -> None:
        self.model = model.eval()
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        self.max_new_tokens_cap = max_new_tokens_cap
        self.compact = compact
        self._rng = random.Random(seed)  # seeds for requests that bring none
        # Called after every decoder step: a server's liveness check (serving.liveness) sees progress.
        self.on_step: Callable[[], None] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, sources: Sequence[str], settings: DecodingConfig | Sequence[DecodingConfig] = DecodingConfig()
    ) -> list[Generation]:
        """Decode every source with its settings (one for all, or one per source).

        A row samples from its settings' seed as given: sources under one seed draw the same
        numbers unless their settings come from :func:`settings_per_source`.
        """
        _check_not_one_string(sources)
        source_ids = self.source_tokenizer.encode(sources)
        hypotheses = self.generate_ids(source_ids, settings)
        texts = iter(self.target_tokenizer.decode([h.tokens for hyps in hypotheses for h in hyps]))
        return [
            Generation(source, len(ids), [Candidate(h.tokens, next(texts), h.logprob, h.finish_reason) for h in hyps])
            for source, ids, hyps in zip(sources, source_ids, hypotheses)
        ]

    def generate_sorted(
        self, sources: Sequence[str], settings: DecodingConfig, batch_size: int = 256
    ) -> list[Generation]:
        """Decode many sources in batches of similar length; results in input order.

        A seed samples each source from a stream of its own (see :func:`settings_per_source`).
        """
        _check_not_one_string(sources)
        per_source = settings_per_source(settings, len(sources))
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        results: list[Generation | None] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, generation in zip(chunk, self.generate([sources[i] for i in chunk], [per_source[i] for i in chunk])):
                results[i] = generation
        return results

    @torch.inference_mode()
    def generate_ids(
        self, source_ids: Sequence[Sequence[int]], settings: DecodingConfig | Sequence[DecodingConfig]
    ) -> list[list[_Hypothesis]]:
        """Decode token-id sources; the hypotheses of each, best first."""
        if isinstance(settings, DecodingConfig):
            settings = [settings] * len(source_ids)
        if len(settings) != len(source_ids):
            raise ValueError(f"{len(source_ids)} sources but {len(settings)} settings")
        for s in settings:
            if s.max_new_tokens > self.max_new_tokens_cap:
                raise ValueError(f"max_new_tokens {s.max_new_tokens} exceeds the cap {self.max_new_tokens_cap}")
        if not source_ids:
            return []
        # An input that tokenises to nothing is decoded as the empty sequence (EOS alone).
        rows = [list(ids) or [EOS_ID] for ids in source_ids]
        lengths = torch.tensor([len(r) for r in rows])
        source = pad(rows)
        with _recurrent_kernel(len(rows)):
            encoded = self.model.encode(source.to(self.device), lengths)

        results: list[list[_Hypothesis]] = [[] for _ in rows]
        beam = [i for i, s in enumerate(settings) if s.mode == "beam"]
        other = [i for i, s in enumerate(settings) if s.mode != "beam"]
        if other:
            for i, hyps in zip(other, self._sample([settings[i] for i in other], encoded.state, other)):
                results[i] = hyps
        if beam:
            for i, hyps in zip(beam, self._beam([settings[i] for i in beam], encoded.state, beam)):
                results[i] = hyps
        return results

    def _step_logprobs(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """One decoder step: logits and log-probabilities ``(rows, vocab)``; PAD and BOS are never emitted."""
        with _recurrent_kernel(tokens.shape[0]):
            logits, state = self.model.decode(tokens[:, None], state)
        logits = logits[:, 0].float()
        logits[:, PAD_ID] = float("-inf")
        logits[:, BOS_ID] = float("-inf")
        if self.on_step is not None:
            self.on_step()
        return logits, logits.log_softmax(dim=-1), state

    # -- greedy and sampled decoding ----------------------------------------------------------------

    def _sample(self, settings: Sequence[DecodingConfig], state: State, positions: list[int]) -> list:
        """Greedy and sampled rows: one decoder row per returned candidate."""
        device = self.device
        request_of_row, keys, params = [], [], []
        for r, s in enumerate(settings):
            n = s.num_return_sequences if s.mode == "sample" else 1
            # A temperature this close to 0 is argmax, and dividing by it would overflow.
            greedy = s.mode == "greedy" or s.temperature < MIN_TEMPERATURE
            seed = s.seed if s.seed is not None or greedy else self._rng.getrandbits(63)
            for j in range(n):
                request_of_row.append(r)
                keys.append((0, 0) if greedy else row_key(seed, j))  # argmax draws nothing
                params.append((s.temperature, s.top_k, s.top_p, s.max_new_tokens, greedy))
        temperature, top_k, top_p, max_len, greedy = zip(*params)
        live = {
            "row": torch.arange(len(params), device=device),
            "keys": torch.tensor(keys, dtype=torch.long, device=device),
            "temperature": torch.tensor(temperature, device=device),
            "top_k": torch.tensor(top_k, device=device),
            "top_p": torch.tensor(top_p, device=device),
            "max_len": torch.tensor(max_len, device=device),
            "greedy": torch.tensor(greedy, device=device),
        }
        state = _select_rows(state, torch.tensor([positions[r] for r in request_of_row], device=device))
        steps = max(max_len)
        out = torch.full((len(params), steps), PAD_ID, dtype=torch.long, device=device)
        logprob = torch.zeros(len(params), dtype=wide_dtype(device), device=device)
        length = torch.zeros(len(params), dtype=torch.long, device=device)
        ended_by_eos = torch.zeros(len(params), dtype=torch.bool, device=device)
        done_rows = torch.zeros(len(params), dtype=torch.bool, device=device)
        tokens = torch.full((len(params),), BOS_ID, dtype=torch.long, device=device)

        # Only a batch that mixes greedy and sampled rows looks for its sampled rows each step,
        # which waits for the GPU; the others know them on the host.
        all_greedy = all(greedy)
        mixed = any(greedy) and not all_greedy
        for t in range(steps):
            logits, logp, state = self._step_logprobs(tokens, state)
            tokens = logits.argmax(dim=-1) if all_greedy else self._choose(logits, live, t, mixed=mixed)
            # Without compaction finished rows keep stepping, but their results are left alone.
            running = slice(None) if self.compact else ~done_rows
            row, chosen = live["row"][running], tokens[running]
            out[row, t] = chosen
            logprob[row] += logp[running].gather(1, chosen[:, None]).squeeze(1).to(logprob.dtype)
            eos = chosen == EOS_ID
            finished = eos | (t + 1 >= live["max_len"][running])
            length[row] = torch.where(eos, t, t + 1)
            ended_by_eos[row] = eos
            done_rows[row] |= finished
            if not self.compact:
                if bool(done_rows.all()):
                    break
                continue
            ended = int(finished.sum())  # the step's one wait for the device
            if ended == finished.numel():
                break
            if ended:
                keep = still_running(finished, ended)
                live = {k: v.index_select(0, keep) for k, v in live.items()}
                state = _select_rows(state, keep)
                tokens = tokens.index_select(0, keep)

        out, logprob, length, ended_by_eos = out.tolist(), logprob.tolist(), length.tolist(), ended_by_eos.tolist()
        per_request: list[list[_Hypothesis]] = [[] for _ in settings]
        for r, request in enumerate(request_of_row):
            reason = "eos" if ended_by_eos[r] else "length"
            per_request[request].append(_Hypothesis(out[r][: length[r]], logprob[r], reason))
        for hyps in per_request:
            hyps.sort(key=lambda h: -h.logprob)
        return per_request

    def _choose(self, logits: torch.Tensor, live: dict[str, torch.Tensor], step: int, mixed: bool) -> torch.Tensor:
        """Next token of every live row: argmax for greedy rows, a filtered sample for the others."""
        tokens = logits.argmax(dim=-1)
        if mixed:
            sampled = (~live["greedy"]).nonzero().squeeze(1)
        else:
            sampled = torch.arange(logits.shape[0], device=logits.device)
        if sampled.numel():
            probs, order = filtered_distribution(
                logits.index_select(0, sampled),
                live["temperature"].index_select(0, sampled),
                live["top_k"].index_select(0, sampled),
                live["top_p"].index_select(0, sampled),
            )
            uniform = counter_uniform(live["keys"].index_select(0, sampled), step)
            tokens[sampled] = sample_from(probs, order, uniform)
        return tokens

    # -- beam search --------------------------------------------------------------------------------

    def _beam(self, settings: Sequence[DecodingConfig], state: State, positions: list[int]) -> list:
        """Beam search for every beam request at once; ``beam_size`` may differ per request."""
        device = self.device
        n = len(settings)
        width = max(s.beam_size for s in settings)
        steps = max(s.max_new_tokens for s in settings)
        beams = torch.tensor([s.beam_size for s in settings], device=device)
        max_len = torch.tensor([s.max_new_tokens for s in settings], device=device)
        alpha = torch.tensor([s.length_penalty for s in settings], device=device)
        average = torch.tensor([s.length_penalty_form == "average" for s in settings], device=device)

        request_rows = torch.tensor(positions, device=device).repeat_interleave(width)
        state = _select_rows(state, request_rows)
        live = {
            "request": torch.arange(n, device=device),
            "beams": beams,
            "max_len": max_len,
            "alpha": alpha,
            "average": average,
        }
        beam_rank = torch.arange(width, device=device)[None, :]
        # Scores sum a log-probability a step: kept wide, so that a long output's total is as exact
        # as greedy's (float32 drifted by 1e-3 over 256 tokens).
        wide = wide_dtype(device)
        scores = torch.full((n, width), float("-inf"), dtype=wide, device=device)
        scores[:, 0] = 0.0
        # Back-pointers instead of copied histories: at each step, every request's live beams
        # (by slot) and the slot of the beam each extends; sequences are traced back at the end.
        step_tokens: list[torch.Tensor] = []
        step_parents: list[torch.Tensor] = []

        # Finished hypotheses of the live requests (fin) and of every request once it ends (done):
        # the step of their last token, that token, and the slot of the live beam it extended.
        def finished_store() -> dict[str, torch.Tensor]:
            return {
                "norm": torch.full((n, width), float("-inf"), dtype=wide, device=device),
                "logprob": torch.zeros((n, width), dtype=wide, device=device),
                "step": torch.zeros((n, width), dtype=torch.long, device=device),
                "token": torch.full((n, width), PAD_ID, dtype=torch.long, device=device),
                "parent": torch.zeros((n, width), dtype=torch.long, device=device),
                "eos": torch.zeros((n, width), dtype=torch.bool, device=device),
            }

        done = finished_store()
        fin = finished_store()
        tokens = torch.full((n * width,), BOS_ID, dtype=torch.long, device=device)

        for t in range(steps):
            b = scores.shape[0]
            _, logp, state = self._step_logprobs(tokens, state)
            valid_beam = beam_rank < live["beams"][:, None]
            # Only a beam's own 2 × width likeliest tokens can be among the request's 2 × width best
            # candidates: pick those in float32 first, then add the wide scores to the few left.
            per_beam = min(2 * width, logp.shape[-1])
            beam_logp, beam_token = logp.view(b, width, -1).topk(per_beam, dim=-1)
            candidates = (scores[:, :, None] + beam_logp.to(wide)).masked_fill(~valid_beam[:, :, None], float("-inf"))
            top_score, top_index = candidates.view(b, -1).topk(min(2 * width, width * per_beam), dim=-1)
            source_beam, token = top_index // per_beam, beam_token.view(b, -1).gather(1, top_index)
            is_eos = token == EOS_ID
            rank = torch.arange(top_score.shape[1], device=device)[None, :]
            in_beam = (rank < live["beams"][:, None]) & torch.isfinite(top_score)
            at_cap = (t + 1 >= live["max_len"])[:, None]
            finishing = in_beam & (is_eos | at_cap)

            # Candidates that end here join the finished ones if they score among the best.
            penalty = length_penalty(
                torch.full_like(top_score, t + 1), live["alpha"][:, None], live["average"][:, None]
            )
            candidate = {
                "norm": torch.where(finishing, top_score / penalty, float("-inf")),
                "logprob": top_score,
                "step": torch.full_like(token, t),
                "token": token,
                "parent": source_beam,
                "eos": is_eos,
            }
            fin["norm"], pick = torch.cat([fin["norm"], candidate["norm"]], dim=1).topk(width, dim=1)
            for key in ("logprob", "step", "token", "parent", "eos"):
                fin[key] = torch.cat([fin[key], candidate[key]], dim=1).gather(1, pick)

            # Live beams: the best candidates that did not end.
            open_score = top_score.masked_fill(is_eos, float("-inf"))
            scores, pick = open_score.topk(width, dim=1)
            scores = scores.masked_fill(~valid_beam, float("-inf"))
            source_beam = source_beam.gather(1, pick)
            tokens = token.gather(1, pick)
            step_tokens.append(torch.full((n, width), PAD_ID, dtype=torch.long, device=device))
            step_tokens[-1][live["request"]] = tokens
            step_parents.append(torch.zeros((n, width), dtype=torch.long, device=device))
            step_parents[-1][live["request"]] = source_beam

            # A request ends once it holds beam_size finished hypotheses and no live beam, were it to
            # end at its next step, would outscore the last of them (Hugging Face's default rule).
            # Stopping at beam_size finished alone dropped better, longer outputs whenever a length
            # penalty favours them; bounding by the length cap instead is exact but runs far longer.
            held = (torch.isfinite(fin["norm"]) & valid_beam).sum(dim=1) >= live["beams"]
            last_held = fin["norm"].gather(1, (live["beams"] - 1)[:, None])[:, 0]
            next_length = torch.full_like(live["max_len"], t + 2)
            best_open = scores.max(dim=1).values / length_penalty(next_length, live["alpha"], live["average"])
            enough = held & (best_open <= last_held)
            finished = enough | at_cap[:, 0] | ~torch.isfinite(scores).any(dim=1)
            state = _select_rows(state, (torch.arange(b, device=device)[:, None] * width + source_beam).view(-1))
            tokens = tokens.view(-1)
            ended = finished.nonzero().squeeze(1)  # the step's one wait for the device
            if ended.numel():
                requests = live["request"].index_select(0, ended)
                for key, value in fin.items():
                    done[key].index_copy_(0, requests, value.index_select(0, ended))
                if ended.numel() == b:
                    break
                keep = still_running(finished, ended.numel())
                live = {k: v.index_select(0, keep) for k, v in live.items()}
                fin = {k: v.index_select(0, keep) for k, v in fin.items()}
                scores = scores[keep]
                rows = (keep[:, None] * width + beam_rank).view(-1)
                state = _select_rows(state, rows)
                tokens = tokens.index_select(0, rows)

        sequences = trace_back(step_tokens, step_parents, done["step"], done["token"], done["parent"])
        length = torch.where(done["eos"], done["step"], done["step"] + 1)  # EOS is not part of the output
        norm, logprob, out, length, eos = (
            x.tolist() for x in (done["norm"], done["logprob"], sequences, length, done["eos"])
        )
        results = []
        for r, s in enumerate(settings):
            hyps = [
                _Hypothesis(out[r][j][: length[r][j]], logprob[r][j], "eos" if eos[r][j] else "length")
                for j in range(width)
                if norm[r][j] != float("-inf")
            ]
            results.append(hyps[: s.num_return_sequences])
        return results
