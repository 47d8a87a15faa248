"""The fine-tuning loss on padded batches: an example's loss in a batch equals its loss alone,
and the step-token mean weights every labelled token alike."""
import numpy as np
import torch

from gptscale.data.sft import SFTExamples, validation_batches_sft
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import IGNORE_INDEX, vocab_parallel_cross_entropy
from gptscale.parallel.topology import TPGroup
from tests.unit.test_model import small

PAD = 0


def examples(vocab):
    g = np.random.default_rng(0)
    rows = []
    for length, prompt in ((9, 4), (17, 3), (6, 5)):
        ids = g.integers(3, vocab, length).astype(np.uint32)
        mask = np.zeros(length, np.uint8)
        mask[prompt:] = 1
        rows.append((ids, mask, prompt, "answer"))
    return SFTExamples.build(rows, seq_len=24, vocab_size=vocab)


def test_a_padded_example_s_loss_equals_its_loss_alone():
    torch.manual_seed(0)
    model = GPT(small("llama", vocab_size=300))
    data = examples(300)
    (ids, labels), = validation_batches_sft(data, 24, PAD, 3, 1)  # the three examples, padded to 24
    per_token = vocab_parallel_cross_entropy(model(ids), labels, TPGroup.single())
    for row in range(3):
        alone_ids, alone_labels = ids[row:row + 1, :len(data.ids(row)) - 1], labels[row:row + 1, :len(data.ids(row)) - 1]
        alone = model(alone_ids, labels=alone_labels)  # no padding at all
        in_batch = per_token[row].sum() / (labels[row] != IGNORE_INDEX).sum()
        assert abs(in_batch.item() - alone.item()) <= 1e-5, row
        # exactly the response tokens are labelled: tokens prompt .. end, shifted by one
        assert (labels[row] != IGNORE_INDEX).sum().item() == len(data.ids(row)) - data.prompt_tokens[row]
    # The step-token mean is the mean over every labelled token, whatever the example lengths.
    tokens = (labels != IGNORE_INDEX).sum()
    step_mean = model(ids, labels=labels, num_valid_tokens=tokens)
    assert abs(step_mean.item() - (per_token.sum() / tokens).item()) <= 1e-6
    assert abs(step_mean.item() - model(ids, labels=labels).item()) <= 1e-6  # one micro-batch: the same
