"""The encoder–decoder: embeddings, a recurrent encoder, a bridge, a recurrent decoder.

Decoder state is a tuple of tensors with the batch on dimension 1: ``(h, c)`` for
LSTM cells and ``(h,)`` for GRU and plain RNN cells, each ``(layers, batch, hidden)``;
with attention it also carries the attentional vector fed back as input, the encoder
memory, its projected keys and its mask. Keeping it one tuple lets the decoding
engine select or reorder rows with one line whatever the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from genrnn.config import ModelConfig
from genrnn.tokenizer import PAD_ID

State = tuple[torch.Tensor, ...]

_CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# oneDNN's CPU LSTM re-packs the weights on every call: it pays off from a few hundred rows
# a step, and is several times slower than PyTorch's own kernel for a handful (measured in
# BENCHMARKS.md's "Decoding speed"). GPUs ignore it.
ONEDNN_MIN_ROWS = 256


def state_size(cell: str) -> int:
    """Number of state tensors a cell carries: 2 for LSTM (h, c), 1 otherwise."""
    return 2 if cell == "lstm" else 1


def init_recurrent(rnn: nn.RNNBase) -> None:
    """Orthogonal recurrent matrices (one per gate), Xavier input matrices, forget bias 1.

    PyTorch adds two bias vectors per layer (``bias_ih + bias_hh``); the forget gate's
    effective bias is their sum, so one is set to 1 and the other to 0.
    """
    hidden = rnn.hidden_size
    for name, param in rnn.named_parameters():
        if name.startswith("weight_hh"):
            for gate in param.data.split(hidden, dim=0):
                nn.init.orthogonal_(gate)
        elif name.startswith("weight_ih"):
            nn.init.xavier_uniform_(param.data)
        elif name.startswith("bias"):
            param.data.zero_()
            if isinstance(rnn, nn.LSTM) and name.startswith("bias_ih"):
                param.data[hidden : 2 * hidden] = 1.0  # gate order: input, forget, cell, output


def _map_data(x: torch.Tensor | PackedSequence, fn) -> torch.Tensor | PackedSequence:
    """Apply an elementwise function to a tensor or to a packed sequence's data."""
    return x._replace(data=fn(x.data)) if isinstance(x, PackedSequence) else fn(x)


class StackedRNN(nn.Module):
    """Layers of fused recurrent kernels (cuDNN on GPU) with dropout and optional residuals between."""

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden: int,
        layers: int,
        bidirectional: bool = False,
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [hidden * directions] * (layers - 1)
        self.layers = nn.ModuleList(
            _CELLS[cell](size, hidden, batch_first=True, bidirectional=bidirectional) for size in sizes
        )
        for layer in self.layers:
            init_recurrent(layer)
        self.dropout = nn.Dropout(dropout)
        self.residual = residual
        self.is_lstm = cell == "lstm"

    def forward(
        self, x: torch.Tensor | PackedSequence, state: State | None = None
    ) -> tuple[torch.Tensor | PackedSequence, State]:
        """Run every layer. ``state`` and the returned state: tensors ``(layers × directions, batch, hidden)``."""
        x, finals = self.run_layers(x, self.split_state(state))
        return x, self.join_states(finals)

    def run_layers(
        self, x: torch.Tensor | PackedSequence, states: list[State] | list[None], first: int = 0
    ) -> tuple[torch.Tensor | PackedSequence, list[State]]:
        """Run layers ``first``, ``first + 1``, … each from its own state (:meth:`split_state`), as many
        as there are states; the output and each layer's final state.

        A decoder stepping one position at a time keeps its state split this way between
        steps, so that each step does not slice the stacked state apart and join it again.
        """
        finals = []
        for i, (layer, layer_state) in enumerate(zip(self.layers[first:], states), start=first):
            if i > 0:
                x = _map_data(x, self.dropout)
            if layer_state is not None and not self.is_lstm:
                layer_state = layer_state[0]
            out, final = layer(x, layer_state)
            if self.residual and i > 0:
                out = _map_data(out, lambda data, x=x: data + (x.data if isinstance(x, PackedSequence) else x))
            finals.append(final if self.is_lstm else (final,))
            x = out
        return x, finals

    def split_state(self, state: State | None) -> list[State] | list[None]:
        """The stacked state ``(layers × directions, batch, hidden)`` as one state per layer."""
        if state is None:
            return [None] * len(self.layers)
        directions = 2 if self.layers[0].bidirectional else 1
        return [tuple(s[i * directions : (i + 1) * directions] for s in state) for i in range(len(self.layers))]

    @staticmethod
    def join_states(states: list[State]) -> State:
        """The layers' states stacked again: the inverse of :meth:`split_state`."""
        return tuple(torch.cat(parts, dim=0) for parts in zip(*states))


class Bridge(nn.Module):
    """Maps the encoder's final state of every layer to the decoder's initial state.

    ``bridge``: a learned projection of all layers and directions (tanh for ``h``,
    linear for the LSTM cell ``c``); ``last``: a copy of the last encoder layers
    (directions concatenated); ``zero``: zeros.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.bridge
        self.encoder_layers = config.encoder_layers
        self.directions = 2 if config.bidirectional else 1
        self.decoder_layers = config.decoder_layers
        self.decoder_hidden = config.decoder_hidden
        if self.kind == "bridge":
            size_in = config.encoder_layers * config.encoder_output_size
            size_out = config.decoder_layers * config.decoder_hidden
            self.projections = nn.ModuleList(nn.Linear(size_in, size_out) for _ in range(state_size(config.cell)))

    def _per_layer(self, s: torch.Tensor) -> torch.Tensor:
        """(layers × directions, batch, hidden) → (layers, batch, directions × hidden)."""
        layers_dirs, batch, hidden = s.shape
        s = s.view(self.encoder_layers, self.directions, batch, hidden)
        return s.permute(0, 2, 1, 3).reshape(self.encoder_layers, batch, self.directions * hidden)

    def forward(self, encoder_state: State) -> State:
        batch = encoder_state[0].shape[1]
        if self.kind == "zero":
            shape = (self.decoder_layers, batch, self.decoder_hidden)
            return tuple(s.new_zeros(shape) for s in encoder_state)
        per_layer = [self._per_layer(s) for s in encoder_state]
        if self.kind == "last":
            return tuple(s[-self.decoder_layers :].contiguous() for s in per_layer)
        out = []
        for i, (s, projection) in enumerate(zip(per_layer, self.projections)):
            flat = s.permute(1, 0, 2).reshape(batch, -1)
            mapped = projection(flat).view(batch, self.decoder_layers, self.decoder_hidden)
            mapped = torch.tanh(mapped) if i == 0 else mapped  # h is bounded, c is not
            out.append(mapped.permute(1, 0, 2).contiguous())
        return tuple(out)


class Attention(nn.Module):
    """Global attention over the encoder memory: Luong's bilinear score or Bahdanau's additive one.

    The memory is projected to keys once per batch (:meth:`keys`); each step scores
    the keys against a query ``(batch, decoder_hidden)``, masks the padding, and
    returns the context vector ``(batch, memory_size)``.
    """

    def __init__(self, kind: str, memory_size: int, query_size: int, attention_size: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "luong":  # score = q · W m
            self.key = nn.Linear(memory_size, query_size, bias=False)
        else:  # score = v · tanh(W_k m + W_q q)
            self.key = nn.Linear(memory_size, attention_size, bias=False)
            self.query = nn.Linear(query_size, attention_size)
            self.energy = nn.Linear(attention_size, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """(src_len, batch, memory_size) → (src_len, batch, key_size)."""
        return self.key(memory)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """One step: ``query (batch, query)`` → context ``(batch, memory)``; ``padding`` is ``~mask``."""
        if self.kind == "luong":
            return self.attend_all(query[:, None], memory, keys, padding)[:, 0]
        scores = self.energy(torch.tanh(keys + self.query(query)[None])).squeeze(-1)
        weights = scores.masked_fill(padding, float("-inf")).softmax(dim=0)  # (src_len, batch)
        return (weights[:, :, None] * memory).sum(0)

    def attend_all(
        self, queries: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """Luong's attention for every position at once: ``(batch, steps, query)`` → ``(batch, steps, memory)``.

        One step of the decoder is the case of one position, so both paths share this arithmetic.
        """
        scores = torch.einsum("btq,sbq->bts", queries, keys)
        weights = scores.masked_fill(padding.t()[:, None, :], float("-inf")).softmax(dim=-1)
        return torch.einsum("bts,sbm->btm", weights, memory)


@dataclass
class Encoded:
    """What the encoder hands the decoder."""

    memory: torch.Tensor  # (batch, src_len, encoder_output_size), for attention
    mask: torch.Tensor  # (batch, src_len), True at real tokens
    state: State  # decoder initial state, each (decoder_layers, batch, decoder_hidden)


class Seq2Seq(nn.Module):
    """Encoder–decoder whose encoder's final state initialises the decoder."""

    encode_by_length = True  # see _encode_by_length; off, the encoder always reads packed sequences

    def __init__(self, config: ModelConfig, source_vocab_size: int, target_vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.source_vocab_size = source_vocab_size
        self.target_vocab_size = target_vocab_size
        self.source_embedding = nn.Embedding(source_vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        self.target_embedding = nn.Embedding(target_vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        for embedding in (self.source_embedding, self.target_embedding):
            nn.init.uniform_(embedding.weight, -0.1, 0.1)
            embedding.weight.data[PAD_ID] = 0.0
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.encoder = StackedRNN(
            config.cell,
            config.embedding_dim,
            config.encoder_hidden,
            config.encoder_layers,
            config.bidirectional,
            config.layer_dropout,
            config.residual,
        )
        self.bridge = Bridge(config)
        self.recurrent_states = state_size(config.cell)
        decoder_input = config.embedding_dim
        if config.attention != "none":
            self.attention = Attention(
                config.attention, config.encoder_output_size, config.decoder_hidden, config.attention_size
            )
            # Luong feeds the previous attentional vector back in (unless input feeding is off);
            # Bahdanau feeds the context.
            if config.attention == "bahdanau":
                decoder_input += config.encoder_output_size
            elif config.input_feeding:
                decoder_input += config.decoder_hidden
            self.attentional = nn.Linear(config.encoder_output_size + config.decoder_hidden, config.decoder_hidden)
        self.decoder = StackedRNN(
            config.cell,
            decoder_input,
            config.decoder_hidden,
            config.decoder_layers,
            dropout=config.layer_dropout,
            residual=config.residual,
        )
        self.output_dropout = nn.Dropout(config.output_dropout)
        self.output = nn.Linear(config.decoder_hidden, target_vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.target_embedding.weight

    def encode(self, source: torch.Tensor, source_lengths: torch.Tensor) -> Encoded:
        """Encode padded ``source`` (batch, src_len) of the given lengths (on any device)."""
        embedded = self.embedding_dropout(self.source_embedding(source))
        if self._encodes_by_length(embedded):
            memory, final = self._encode_by_length(embedded, source_lengths)
        else:
            packed = pack_padded_sequence(embedded, source_lengths.cpu(), batch_first=True, enforce_sorted=False)
            output, final = self.encoder(packed)
            memory, _ = pad_packed_sequence(output, batch_first=True, total_length=source.shape[1])
        mask = source != PAD_ID
        state = self.bridge(final)
        if self.config.attention != "none":
            batch = source.shape[0]
            feed = memory.new_zeros(1, batch, self.config.decoder_hidden)
            memory_t = memory.transpose(0, 1).contiguous()  # batch on dimension 1, like the rest of the state
            state = (*state, feed, memory_t, self.attention.keys(memory_t), mask.t().contiguous())
        return Encoded(memory=memory, mask=mask, state=state)

    def _encodes_by_length(self, embedded: torch.Tensor) -> bool:
        """Whether to encode the rows of each length together: decoding many rows on a CPU with oneDNN."""
        return (
            self.encode_by_length
            and not torch.is_grad_enabled()
            and embedded.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")  # oneDNN's LSTM would give bf16 where packing gives float32
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and embedded.shape[0] >= ONEDNN_MIN_ROWS
        )

    def _encode_by_length(self, embedded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The encoder's output and final state, each length's rows run together without packing.

        oneDNN's LSTM takes no packed sequence, so a packed batch runs on PyTorch's own
        kernel, a step at a time over a shrinking batch; a dozen unpacked groups run on
        oneDNN's, about twice as fast over a thousand G2P words (BENCHMARKS.md, "Encoding by length").
        """
        rows, steps = embedded.shape[:2]
        lengths = lengths.to(embedded.device)
        memory = embedded.new_zeros(rows, steps, self.config.encoder_output_size)
        final: list[torch.Tensor] = []
        for length in lengths.unique().tolist():
            group = (lengths == length).nonzero().squeeze(1)
            output, state = self.encoder(embedded[group, :length])
            memory[group, :length] = output
            final = final or [s.new_zeros(s.shape[0], rows, s.shape[2]) for s in state]
            for whole, part in zip(final, state):
                whole[:, group] = part
        return memory, tuple(final)

    def decode(self, target_in: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Logits ``(batch, steps, vocab)`` for decoder inputs ``(batch, steps)``, and the new state."""
        embedded = self.embedding_dropout(self.target_embedding(target_in))
        if self.config.attention == "none":
            output, state = self.decoder(embedded, state)
        elif not self.config.input_feeding:
            output, state = self._attend_all(embedded, state)
        else:
            output, state = self._attend(embedded, state)
        return self.output(self.output_dropout(output)), state

    def _attend(self, embedded: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The attentional decoder, one step at a time: ``(batch, steps, embedding)`` → ``(batch, steps, hidden)``.

        A training step is mostly this loop's host time on a GPU, so the loop holds only
        what must be done a position at a time: the layers' states stay split between
        steps, and Bahdanau's attentional layer, which feeds nothing back, runs over all
        positions after it.
        """
        recurrent, (feed, memory, keys, mask) = state[: self.recurrent_states], state[self.recurrent_states :]
        layers, padding = self.decoder.split_state(recurrent), ~mask
        luong = self.config.attention == "luong"
        bottom = self.config.attention_query == "bottom"
        query, stepping = (0, 1) if bottom else (-1, len(layers))  # the layer that queries; how many step
        tops, contexts = [], []
        for t in range(embedded.shape[1]):
            if luong:
                top, layers = self.decoder.run_layers(torch.cat([embedded[:, t], feed[0]], dim=-1)[:, None], layers)
                top = top[:, 0]
                context = self.attention(top, memory, keys, padding)
                feed = torch.tanh(self.attentional(torch.cat([context, top], dim=-1)))[None]
                tops.append(feed[0])
            else:
                # The query: the previous state of the top layer, or of the bottom one, which alone then steps.
                context = self.attention(layers[query][0][0], memory, keys, padding)
                stepped = torch.cat([embedded[:, t], context], dim=-1)[:, None]
                out, layers[:stepping] = self.decoder.run_layers(stepped, layers[:stepping])
                tops.append(out[:, 0])
                contexts.append(context)
        if luong:
            attentional = torch.stack(tops, dim=1)
        else:
            context, top = torch.stack(contexts, dim=1), torch.stack(tops, dim=1)
            if stepping < len(layers):  # the layers above the bottom, over every position at once
                top, layers[stepping:] = self.decoder.run_layers(top, layers[stepping:], first=stepping)
            attentional = torch.tanh(self.attentional(torch.cat([context, top], dim=-1)))
            feed = attentional[:, -1][None]
        return attentional, (*self.decoder.join_states(layers), feed, memory, keys, mask)

    def _attend_all(self, embedded: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Luong attention without input feeding: the decoder over every position in one call, then attention."""
        recurrent, (_, memory, keys, mask) = state[: self.recurrent_states], state[self.recurrent_states :]
        top, recurrent = self.decoder(embedded, recurrent)
        context = self.attention.attend_all(top, memory, keys, ~mask)
        attentional = torch.tanh(self.attentional(torch.cat([context, top], dim=-1)))
        # The state keeps its layout, so the decoding engine needs no second case.
        return attentional, (*recurrent, attentional[:, -1][None], memory, keys, mask)

    def forward(self, source: torch.Tensor, source_lengths: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``(batch, tgt_len, vocab)`` for ``target_in = BOS y1 … yn``."""
        logits, _ = self.decode(target_in, self.encode(source, source_lengths).state)
        return logits

    def state_layout(self) -> tuple[str, ...]:
        """Names of the decoder state's tensors, in order."""
        recurrent = ("h", "c") if self.recurrent_states == 2 else ("h",)
        return recurrent if self.config.attention == "none" else (*recurrent, "feed", "memory", "keys", "mask")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
