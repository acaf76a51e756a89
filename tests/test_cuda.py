"""The CUDA paths: placement, cuDNN kernels, mixed-precision training, and GPU decoding against the CPU.

Skipped where there is no GPU.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import warnings

import pytest
import torch

from genrnn.bundle import load_bundle
from genrnn.config import DecodingConfig
from genrnn.data import PairDataset, collate, read_examples, training_pairs
from genrnn.decoding import Generator
from genrnn.evaluation import evaluate
from genrnn.model import Seq2Seq
from genrnn.tokenizer import EOS_ID, train_tokenizer
from tests.test_decoding import WORDS, small_config
from tests.test_model import ATTENTION
from tests.test_training import run_cli, tiny_train
from training.distillation import Distillation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODES = {"greedy": DecodingConfig(mode="greedy"), "beam": DecodingConfig(mode="beam", beam_size=4)}


@pytest.fixture
def float32_matmul():
    """TF32 off, so that the GPU and the CPU agree to float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generator_on(bundle_dir, device: str) -> Generator:
    bundle = load_bundle(bundle_dir, device)
    return Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)


def test_a_bundle_loads_onto_the_gpu_in_eval_mode(tiny_bundle):
    model = load_bundle(tiny_bundle, "cuda").model
    assert all(p.is_cuda for p in model.parameters())
    assert not model.training


def test_the_recurrent_layers_run_on_cudnn(tiny_bundle):
    generator = generator_on(tiny_bundle, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        generator.generate(["cat", "spelling"], MODES["greedy"])
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_cudnn_rnn" in ops, sorted(op for op in ops if "rnn" in op or "lstm" in op)


def synchronisations(generator: Generator, settings: DecodingConfig) -> int:
    """How many times decoding ``WORDS`` waits for the GPU, by torch's sync debug mode."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generator.generate(WORDS, settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_decoding_waits_for_the_gpu_once_a_step(tiny_bundle, mode):
    bundle = load_bundle(tiny_bundle, "cuda")
    with torch.no_grad():
        bundle.model.output.bias[EOS_ID] = float("-inf")  # never ends: every row runs every step
    generator = Generator(bundle.model, bundle.source_tokenizer, bundle.target_tokenizer)
    generator.generate(WORDS, DecodingConfig(mode=mode, seed=1))  # warm-up
    short, long = (synchronisations(generator, DecodingConfig(mode=mode, seed=1, max_new_tokens=n)) for n in (8, 16))
    assert long - short == 8  # the step's check for finished rows, and nothing else


@pytest.mark.parametrize("mode", MODES)
def test_gpu_decoding_gives_the_cpus_outputs(tiny_bundle, g2p_files, float32_matmul, mode):
    sources = [e.source for e in read_examples(g2p_files["test"])]
    cpu = generator_on(tiny_bundle, "cpu").generate_sorted(sources, MODES[mode])
    gpu = generator_on(tiny_bundle, "cuda").generate_sorted(sources, MODES[mode])
    same = [c.candidates[0].text == g.candidates[0].text for c, g in zip(cpu, gpu)]
    # Summation order differs between the two, so a near-tie may rarely flip; a wrong path flips most.
    assert sum(same) >= 0.98 * len(same), f"{len(same) - sum(same)} of {len(same)} differ"
    for c, g, equal in zip(cpu, gpu, same):
        if equal:
            assert g.candidates[0].logprob == pytest.approx(c.candidates[0].logprob, abs=1e-3)


def test_scoring_on_the_gpu_gives_the_cpus_scores(tiny_bundle, g2p_files, float32_matmul):
    examples = read_examples(g2p_files["test"])
    cpu = evaluate(generator_on(tiny_bundle, "cpu"), examples, MODES["greedy"])
    gpu = evaluate(generator_on(tiny_bundle, "cuda"), examples, MODES["greedy"])
    assert gpu.items == cpu.items == len(examples)
    assert gpu.wer == pytest.approx(cpu.wer, abs=0.02) and gpu.per == pytest.approx(cpu.per, abs=0.01)


@pytest.mark.parametrize("attention", ["none", *ATTENTION])
def test_teacher_forced_logits_agree_with_the_cpu(attention, float32_matmul):
    torch.manual_seed(0)
    overrides = ATTENTION.get(attention, {})
    model = Seq2Seq(small_config(encoder_layers=2, decoder_layers=2, **overrides), 40, 50).eval()
    lengths = torch.tensor([7, 3, 5])
    source = torch.randint(4, 40, (3, 7)) * (torch.arange(7) < lengths[:, None])
    target = torch.randint(4, 50, (3, 6))
    with torch.no_grad():
        expected = model(source, lengths, target)
        actual = model.cuda()(source.cuda(), lengths, target.cuda())
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["none", *ATTENTION])
def test_every_mode_decodes_the_same_on_the_gpu(attention, float32_matmul):
    torch.manual_seed(1)
    source = train_tokenizer(WORDS * 3, "char", 64)
    target = train_tokenizer(["K AE1 T", "D AO1 G", "HH AW1 S", "AH0", "T R IY1"] * 3, "word", 64)
    model = Seq2Seq(small_config(**ATTENTION.get(attention, {})), source.vocab_size, target.vocab_size)
    with torch.no_grad():
        model.output.bias[EOS_ID] = 2.0  # rows end at different steps
    on_cpu = Generator(model, source, target)
    on_gpu = Generator(copy.deepcopy(model).cuda(), source, target)
    settings = [*MODES.values(), DecodingConfig(mode="sample", seed=3, num_return_sequences=2)]
    for setting in settings:
        expected, actual = on_cpu.generate(WORDS, setting), on_gpu.generate(WORDS, setting)
        for e, a in zip(expected, actual):
            assert [c.tokens for c in a.candidates] == [c.tokens for c in e.candidates], setting
            assert [c.logprob for c in a.candidates] == pytest.approx([c.logprob for c in e.candidates], abs=1e-4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_on_the_gpu(g2p_files, tmp_path, precision):
    run = tmp_path / "run"
    options = ("--max-epochs", "3", "--precision", precision)
    run_cli(*[a if a != "cpu" else "gpu" for a in tiny_train(g2p_files, run, *options)])
    manifest = json.loads((run / "bundle" / "genrnn.json").read_text())
    assert manifest["training"]["device"].startswith("cuda")
    (metrics,) = (run / "logs").glob("*/metrics.csv")
    val_loss = [float(row["val_loss"]) for row in csv.DictReader(metrics.open()) if row["val_loss"]]
    assert len(val_loss) == 3 and all(math.isfinite(v) for v in val_loss)
    assert val_loss[-1] < 0.95 * val_loss[0]  # it learns: the tiny slice is too small for whole words in three epochs
    model = load_bundle(run / "bundle", "cuda").model
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_the_generate_job_on_the_gpu_matches_the_cpu(tiny_bundle, g2p_files, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("".join(e.source + "\n" for e in read_examples(g2p_files["test"])))
    outputs = {}
    for accelerator in ("cpu", "gpu"):
        out = tmp_path / f"{accelerator}.jsonl"
        args = ["generate", "--model", str(tiny_bundle), "--input", str(words), "--output", str(out)]
        run_cli(*args, "--accelerator", accelerator, env={**os.environ, "NVIDIA_TF32_OVERRIDE": "0"})  # no TF32
        outputs[accelerator] = [json.loads(line)["candidates"][0]["text"] for line in out.read_text().splitlines()]
    same = sum(c == g for c, g in zip(outputs["cpu"], outputs["gpu"]))
    assert len(outputs["gpu"]) == len(outputs["cpu"]) > 0 and same >= 0.98 * len(outputs["cpu"])


def test_the_distillation_table_on_the_gpu_gives_the_cpus_loss_without_waiting(tiny_bundle, g2p_files, float32_matmul):
    teacher = load_bundle(tiny_bundle)
    pairs = training_pairs(read_examples(g2p_files["train"]))[:300]
    dataset = PairDataset(pairs, teacher.source_tokenizer, teacher.target_tokenizer)
    torch.manual_seed(0)
    student = Seq2Seq(teacher.model_config, teacher.model.source_vocab_size, teacher.model.target_vocab_size).eval()
    batch = collate([dataset[i] for i in (250, 3, 17, 0, 125)])
    losses = {}
    for device in ("cpu", "cuda"):
        distillation = Distillation(copy.deepcopy(teacher.model))
        distillation.prepare(dataset, torch.device(device), max_tokens=512)
        on_device = batch.to(device)
        with torch.no_grad():
            log_probs = student.to(device)(on_device.source, on_device.source_lengths, on_device.target_in)
            log_probs = log_probs.log_softmax(dim=-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                losses[device] = distillation.loss(log_probs, on_device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert not [w for w in caught if "synchroniz" in str(w.message)], device
    assert torch.allclose(losses["cuda"].cpu(), losses["cpu"], rtol=1e-4)


def test_the_moving_average_of_the_weights_stays_on_the_gpu(g2p_files, tmp_path, monkeypatch):
    from torch.optim.swa_utils import AveragedModel

    devices, counts = set(), set()
    update = AveragedModel.update_parameters

    def noting_where(self, model):
        devices.update(p.device.type for p in self.parameters())
        counts.add(self.n_averaged.device.type)
        return update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", noting_where)
    options = ("--max-steps", "5", "--set", "training.ema_decay=0.9")
    run_cli(*[a if a != "cpu" else "gpu" for a in tiny_train(g2p_files, tmp_path / "run", *options)])
    assert devices == {"cuda"}  # not the host's memory, which each step would copy every weight to
    assert counts == {"cuda"}  # beside them: on the host, each parameter's update would copy it over, and wait
