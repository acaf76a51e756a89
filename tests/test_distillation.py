"""The teacher's table of next-token distributions, against the teacher run directly."""

from __future__ import annotations

import torch

from genrnn.bundle import load_bundle
from genrnn.data import PairDataset, collate, read_examples, training_pairs
from genrnn.model import Seq2Seq
from genrnn.tokenizer import PAD_ID
from training.distillation import Distillation


def test_the_tables_loss_is_the_cross_entropy_with_the_teachers_distributions(tiny_bundle, g2p_files):
    teacher = load_bundle(tiny_bundle)
    pairs = training_pairs(read_examples(g2p_files["train"]))
    dataset = PairDataset(pairs, teacher.source_tokenizer, teacher.target_tokenizer)
    vocab = teacher.model.target_vocab_size
    distillation = Distillation(teacher.model, top_k=vocab)  # nothing cut off: the loss is exact
    distillation.prepare(dataset, torch.device("cpu"), max_tokens=512)

    torch.manual_seed(0)
    student = Seq2Seq(teacher.model_config, teacher.model.source_vocab_size, vocab).eval()
    batch = collate([dataset[i] for i in (40, 3, 17, 0, 25)])  # any pairs, in any order
    logits = student(batch.source, batch.source_lengths, batch.target_in)
    with torch.no_grad():
        expected = teacher.model(batch.source, batch.source_lengths, batch.target_in).softmax(dim=-1)
    soft = -(expected * logits.log_softmax(dim=-1)).sum(dim=-1)
    exact = soft[batch.target_out != PAD_ID].mean()
    assert torch.allclose(distillation.loss(logits.log_softmax(dim=-1), batch), exact, rtol=1e-3)
    assert distillation.teacher is None  # released once its table is made


def test_the_table_keeps_the_teachers_most_likely_tokens(tiny_bundle, g2p_files):
    teacher = load_bundle(tiny_bundle)
    pairs = training_pairs(read_examples(g2p_files["train"]))[:50]
    dataset = PairDataset(pairs, teacher.source_tokenizer, teacher.target_tokenizer)
    distillation = Distillation(teacher.model, top_k=3)
    distillation.prepare(dataset, torch.device("cpu"), max_tokens=256)

    batch = collate([dataset[7]])
    with torch.no_grad():
        probs = teacher.model(batch.source, batch.source_lengths, batch.target_in).softmax(dim=-1)[0]
    steps, start = probs.shape[0], int(distillation.start[7])
    assert int(distillation.length[7]) == steps
    assert torch.equal(distillation.ids[start : start + steps].long(), probs.topk(3, dim=-1).indices)
    kept = distillation.probs[start : start + steps].float()
    assert torch.allclose(kept.sum(dim=-1), torch.ones(steps), atol=1e-3)  # renormalised


def test_an_ensemble_of_one_model_twice_teaches_what_the_model_does(tiny_bundle, g2p_files):
    single, pair = load_bundle(tiny_bundle), load_bundle(f"{tiny_bundle},{tiny_bundle}")
    pairs = training_pairs(read_examples(g2p_files["train"]))[:80]
    tables = []
    for teacher in (single, pair):
        dataset = PairDataset(pairs, teacher.source_tokenizer, teacher.target_tokenizer)
        distillation = Distillation(teacher.model, top_k=4)
        distillation.prepare(dataset, torch.device("cpu"), max_tokens=256)
        tables.append(distillation)
    assert torch.equal(tables[0].ids, tables[1].ids)
    assert torch.allclose(tables[0].probs.float(), tables[1].probs.float(), atol=2e-3)
