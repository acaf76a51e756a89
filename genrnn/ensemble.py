"""Several models decoded together: their next-token distributions are averaged at each step.

An :class:`Ensemble` has the interface the decoding engine uses (``encode``,
``decode``), so every mode decodes it unchanged. Its state is the members' states
side by side; its "logits" are the log-probabilities of the averaged distribution,
in which PAD and BOS, never emitted, have none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from genrnn.config import AVERAGINGS, DEFAULT_AVERAGING, Averaging
from genrnn.model import Encoded, Seq2Seq, State
from genrnn.tokenizer import BOS_ID, PAD_ID


class Ensemble(nn.Module):
    """Models that share one source and one target vocabulary, decoded as one averaged distribution."""

    def __init__(self, members: Sequence[Seq2Seq], averaging: Averaging = DEFAULT_AVERAGING) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if len({(m.source_vocab_size, m.target_vocab_size) for m in members}) != 1:
            raise ValueError("ensemble members must share their vocabularies")
        if averaging not in AVERAGINGS:
            raise ValueError(f"averaging must be one of {', '.join(AVERAGINGS)}; got {averaging!r}")
        self.averaging = averaging
        self.members = nn.ModuleList(members)
        self.config = members[0].config
        self.source_vocab_size = members[0].source_vocab_size
        self.target_vocab_size = members[0].target_vocab_size
        self._sizes = [len(m.state_layout()) for m in members]  # state tensors per member
        # Made once, where the members are (and moved with them), rather than sent to the device each step.
        device = next(members[0].parameters()).device
        self.register_buffer("never_emitted", torch.tensor([PAD_ID, BOS_ID], device=device), persistent=False)

    def encode(self, source: torch.Tensor, source_lengths: torch.Tensor) -> Encoded:
        encoded = [m.encode(source, source_lengths) for m in self.members]
        state = tuple(s for e in encoded for s in e.state)
        return Encoded(memory=encoded[0].memory, mask=encoded[0].mask, state=state)

    def decode(self, target_in: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Log-probabilities of the averaged distribution ``(batch, steps, vocab)``, and the new state."""
        log_probs, new_state, start = [], [], 0
        for member, size in zip(self.members, self._sizes):
            logits, member_state = member.decode(target_in, state[start : start + size])
            # Each member's distribution as it decodes alone, without the tokens never emitted:
            # a member that gives them mass would otherwise weigh less in the mixture.
            logits = logits.float().index_fill(-1, self.never_emitted, float("-inf"))
            log_probs.append(logits.log_softmax(dim=-1))
            new_state.extend(member_state)
            start += size
        stacked = torch.stack(log_probs)
        if self.averaging == "probabilities":
            averaged = torch.logsumexp(stacked, dim=0) - math.log(len(self.members))
        else:
            averaged = stacked.mean(dim=0).log_softmax(dim=-1)
        return averaged, tuple(new_state)

    def forward(self, source: torch.Tensor, source_lengths: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing, as :meth:`Seq2Seq.forward`: log-probabilities ``(batch, tgt_len, vocab)``."""
        log_probs, _ = self.decode(target_in, self.encode(source, source_lengths).state)
        return log_probs

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
