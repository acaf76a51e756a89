"""The encoder–decoder: shapes, masking, the bridge, initialisation."""

from __future__ import annotations

import itertools

import pytest
import torch

from genrnn.config import ModelConfig, from_dict
from genrnn.errors import ConfigurationError
from genrnn.model import ONEDNN_MIN_ROWS, Seq2Seq
from genrnn.tokenizer import PAD_ID

SRC_VOCAB, TGT_VOCAB = 11, 13


def small(**overrides) -> ModelConfig:
    values = dict(
        embedding_dim=8,
        encoder_hidden=6,
        decoder_hidden=10,
        encoder_layers=1,
        decoder_layers=1,
        embedding_dropout=0.0,
        layer_dropout=0.0,
        output_dropout=0.0,
    )
    return ModelConfig(**{**values, **overrides})


def batch(lengths=(5, 3, 1)):
    torch.manual_seed(0)
    source = torch.randint(4, SRC_VOCAB, (len(lengths), max(lengths)))
    for i, n in enumerate(lengths):
        source[i, n:] = PAD_ID
    return source, torch.tensor(lengths)


@pytest.mark.parametrize(
    "cell,bidirectional,layers,bridge",
    [
        (cell, bi, layers, bridge)
        for cell, bi, layers, bridge in itertools.product(
            ["lstm", "gru", "rnn"], [False, True], [(1, 1), (2, 1), (1, 3), (3, 2)], ["bridge", "zero"]
        )
    ],
)
def test_shapes_for_every_cell_direction_depth_and_bridge(cell, bidirectional, layers, bridge):
    config = small(
        cell=cell, bidirectional=bidirectional, encoder_layers=layers[0], decoder_layers=layers[1], bridge=bridge
    )
    model = Seq2Seq(config, SRC_VOCAB, TGT_VOCAB)
    source, lengths = batch()
    encoded = model.encode(source, lengths)
    assert encoded.memory.shape == (3, 5, config.encoder_output_size)
    assert len(encoded.state) == (2 if cell == "lstm" else 1)
    for s in encoded.state:
        assert s.shape == (layers[1], 3, config.decoder_hidden)
    logits = model(source, lengths, torch.randint(4, TGT_VOCAB, (3, 4)))
    assert logits.shape == (3, 4, TGT_VOCAB)


def test_last_bridge_copies_the_final_encoder_layers():
    config = small(
        bidirectional=True, encoder_layers=3, decoder_layers=2, encoder_hidden=5, decoder_hidden=10, bridge="last"
    )
    model = Seq2Seq(config, SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch()
    encoded = model.encode(source, lengths)
    # Recompute the encoder's final states directly and check the copy, directions concatenated.
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        model.source_embedding(source), lengths, batch_first=True, enforce_sorted=False
    )
    _, (h, c) = model.encoder(packed)
    for copied, final in zip(encoded.state[:2], (h, c)):  # the cell state as the hidden state
        final = final.view(3, 2, 3, 5)
        expected = torch.cat([final[1:, 0], final[1:, 1]], dim=-1)  # last two layers, forward ‖ backward
        torch.testing.assert_close(copied, expected)


def test_last_bridge_rejects_sizes_that_do_not_fit():
    from genrnn.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="model.bridge"):
        small(bridge="last", encoder_hidden=6, decoder_hidden=10, bidirectional=True)


def test_zero_bridge_starts_the_decoder_from_zeros():
    model = Seq2Seq(small(bridge="zero"), SRC_VOCAB, TGT_VOCAB)
    encoded = model.encode(*batch())
    assert all(torch.count_nonzero(s) == 0 for s in encoded.state)


def test_padding_does_not_change_the_encoding():
    model = Seq2Seq(small(bidirectional=True, encoder_layers=2, decoder_layers=2), SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch((5, 2))
    alone = model.encode(source[1:, :2], lengths[1:])
    padded = model.encode(source, lengths)
    for a, b in zip(alone.state, padded.state):
        torch.testing.assert_close(a[:, 0], b[:, 1])
    assert padded.mask.tolist()[1] == [True, True, False, False, False]
    assert torch.all(padded.memory[1, 2:] == 0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
@pytest.mark.parametrize(
    "overrides",
    [
        dict(bidirectional=True, encoder_layers=2, decoder_layers=2, attention="bahdanau"),
        dict(cell="gru", encoder_layers=3, residual=True, attention="luong"),
    ],
    ids=["lstm-bidirectional", "gru-residual"],
)
def test_many_rows_decoded_on_a_cpu_are_encoded_by_length_as_packed_ones_would_be(overrides):
    model = Seq2Seq(small(**overrides), SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch([1 + (i * 7) % 9 for i in range(ONEDNN_MIN_ROWS)])  # nine lengths, every one padded
    calls = []
    model.encoder.register_forward_hook(lambda module, args, output: calls.append(type(args[0]).__name__))
    with torch.inference_mode():
        by_length = model.encode(source, lengths)
        model.encode_by_length = False
        packed = model.encode(source, lengths)
        fewer = model.encode(source[:-1], lengths[:-1])
        model.encode_by_length = True
        with torch.autocast("cpu", dtype=torch.bfloat16):  # training's bf16 validation: packed, as it was
            autocast = model.encode(source, lengths)
    training = model.encode(source, lengths)  # with gradients: packed, as cuDNN and training read them

    assert calls == ["Tensor"] * 9 + ["PackedSequence"] * 4  # a call a length, then packed sequences
    for a, b in zip([by_length.memory, *by_length.state], [packed.memory, *packed.state]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(by_length.mask, packed.mask) and torch.all(by_length.memory[0, 1:] == 0)
    torch.testing.assert_close(training.memory.detach(), packed.memory, rtol=1e-5, atol=1e-6)
    assert fewer.memory.shape[0] == ONEDNN_MIN_ROWS - 1
    torch.testing.assert_close(autocast.memory.float(), packed.memory, rtol=0.05, atol=0.05)


def test_decoder_is_causal_so_padding_after_a_target_changes_nothing():
    model = Seq2Seq(small(), SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch((4,))
    target = torch.tensor([[2, 5, 6]])
    short = model(source, lengths, target)
    longer = model(source, lengths, torch.cat([target, torch.zeros(1, 3, dtype=torch.long)], dim=1))
    torch.testing.assert_close(short, longer[:, :3])


def test_forget_gate_bias_sums_to_one_and_recurrent_matrices_are_orthogonal():
    model = Seq2Seq(small(encoder_layers=2, bidirectional=True), SRC_VOCAB, TGT_VOCAB)
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        hidden = layer.hidden_size
        for suffix in ["_l0", "_l0_reverse"] if layer.bidirectional else ["_l0"]:
            total = getattr(layer, "bias_ih" + suffix) + getattr(layer, "bias_hh" + suffix)
            gates = total.split(hidden)
            assert torch.all(gates[1] == 1.0)  # forget gate (order: input, forget, cell, output)
            assert all(torch.all(g == 0.0) for i, g in enumerate(gates) if i != 1)
            for block in getattr(layer, "weight_hh" + suffix).split(hidden):
                torch.testing.assert_close(block @ block.T, torch.eye(hidden), atol=1e-5, rtol=0)


def test_tied_embeddings_share_one_matrix():
    model = Seq2Seq(small(embedding_dim=10, tie_embeddings=True), SRC_VOCAB, TGT_VOCAB)
    assert model.output.weight is model.target_embedding.weight


def test_residual_connections_change_the_stacked_output():
    torch.manual_seed(0)
    plain = Seq2Seq(small(encoder_layers=3, decoder_layers=3), SRC_VOCAB, TGT_VOCAB).eval()
    torch.manual_seed(0)
    residual = Seq2Seq(small(encoder_layers=3, decoder_layers=3, residual=True), SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch()
    target = torch.randint(4, TGT_VOCAB, (3, 4))
    assert not torch.allclose(plain(source, lengths, target), residual(source, lengths, target))


# Each kind of attention, as model overrides: Luong's with and without input feeding, Bahdanau's.
ATTENTION = {
    "luong": {"attention": "luong"},
    "luong-no-feeding": {"attention": "luong", "input_feeding": False},
    "bahdanau": {"attention": "bahdanau"},
    "bahdanau-bottom": {"attention": "bahdanau", "attention_query": "bottom"},
}


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_attention_shapes(attention, cell):
    model = Seq2Seq(small(cell=cell, attention_size=7, **ATTENTION[attention]), SRC_VOCAB, TGT_VOCAB)
    source, lengths = batch()
    assert model(source, lengths, torch.randint(4, TGT_VOCAB, (3, 4))).shape == (3, 4, TGT_VOCAB)


@pytest.mark.parametrize("attention", ["none", *ATTENTION])
def test_teacher_forcing_equals_decoding_one_step_at_a_time(attention):
    overrides = ATTENTION.get(attention, {})
    model = Seq2Seq(small(encoder_layers=2, decoder_layers=2, **overrides), SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch()
    target = torch.randint(4, TGT_VOCAB, (3, 5))
    whole, _ = model.decode(target, model.encode(source, lengths).state)
    state, steps = model.encode(source, lengths).state, []
    for t in range(5):
        logits, state = model.decode(target[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(whole, torch.cat(steps, dim=1))


@pytest.mark.parametrize("attention", ATTENTION)
def test_attention_never_looks_at_padding(attention):
    model = Seq2Seq(small(**ATTENTION[attention]), SRC_VOCAB, TGT_VOCAB).eval()
    source, lengths = batch((5, 2))
    target = torch.randint(4, TGT_VOCAB, (2, 3))
    padded = model(source, lengths, target)
    alone = model(source[1:, :2], lengths[1:], target[1:])
    torch.testing.assert_close(padded[1], alone[0])


def test_without_input_feeding_the_decoder_reads_only_the_embeddings():
    fed = Seq2Seq(small(attention="luong"), SRC_VOCAB, TGT_VOCAB)
    unfed = Seq2Seq(small(attention="luong", input_feeding=False), SRC_VOCAB, TGT_VOCAB)
    assert fed.decoder.layers[0].input_size == 8 + 10  # embedding and the fed attentional vector
    assert unfed.decoder.layers[0].input_size == 8


@pytest.mark.parametrize("layers", [1, 2])
def test_a_bottom_query_attends_with_the_first_layer_and_has_the_same_weights(layers):
    torch.manual_seed(0)  # the weights, whatever ran before on this worker
    top = Seq2Seq(small(attention="bahdanau", decoder_layers=layers), SRC_VOCAB, TGT_VOCAB).eval()
    with torch.no_grad():
        # Initial weights keep tanh nearly linear, where a query shifts every position's score
        # alike and the softmax cancels it: the outputs of either query differed by 1e-7 for many
        # draws. Larger weights make the query count.
        top.attention.query.weight.mul_(20)
        top.attention.key.weight.mul_(20)
    bottom = Seq2Seq(small(attention="bahdanau", attention_query="bottom", decoder_layers=layers), SRC_VOCAB, TGT_VOCAB)
    bottom.load_state_dict(top.state_dict())  # the same parameters: only the query's layer differs
    source, lengths = batch()
    target = torch.randint(4, TGT_VOCAB, (3, 4))
    same = torch.allclose(top(source, lengths, target), bottom.eval()(source, lengths, target))
    assert same == (layers == 1)  # with one layer, the bottom is the top


def test_only_bahdanau_attention_takes_a_bottom_query():
    with pytest.raises(ConfigurationError, match="model.attention_query"):
        small(attention="luong", attention_query="bottom")
    with pytest.raises(ConfigurationError, match="model.attention_query"):  # checked where every choice is
        from_dict(ModelConfig, {"attention": "bahdanau", "attention_query": "middle"}, "model")


def test_input_feeding_can_be_switched_off_only_for_luong():
    with pytest.raises(ConfigurationError, match="model.input_feeding"):
        small(attention="bahdanau", input_feeding=False)
