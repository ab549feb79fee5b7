"""Packed SFT: several examples per row, a prefix shared by several held once (each token sees only its own
example's earlier tokens, at its own positions), give each example the log-probs and gradients it has alone, and
packed training follows the padded loop's losses."""

import pytest
import torch

from harness import config, train
from harness.losses import sequence_logps
from harness.models.hf import build_tiny
from harness.models.tokenizer import train_tokenizer
from harness.packing import first_fit, pack, packed_logps, plan
from tests.test_train import PAIRS, SMALL, TEXTS, cfg

# prompts of very different lengths (as IFT answers, judge and meta-judge prompts are), many sharing a prefix,
# one the prefix of another, two identical prompts with different answers
EXAMPLES = [(("Sort these numbers: " + " ".join(str(j) for j in range(i % 5 + 1)) + "\n") * (1 + i % 3), str(i))
            for i in range(10)] + [("Sort these numbers: 0\n", "0 0"), ("Sort", "these")]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def test_first_fit_decreasing_by_hand():
    # lengths 7, 5, 4, 3, 2, 2 into rows of 9: 7+2 | 5+4 | 3+2
    assert first_fit([3, 7, 2, 5, 2, 4], 9) == [[1, 2], [3, 5], [0, 4]]
    assert first_fit([12, 1], 9) == [[0], [1]]  # too long for a row: a row of its own


def test_plan_shares_prefixes_and_respects_capacity(tok):
    enc = [train.encode(tok, p, r, 256) for p, r in EXAMPLES]
    cap = max(len(e.ids) for e in enc)
    rows = plan(enc, list(range(len(enc))), cap)
    assert sorted(i for row in rows for tree in row for i in tree) == list(range(len(enc)))
    p = pack(enc, rows, tok.pad_token_id)
    written = (p.ids != tok.pad_token_id).sum(1)
    assert int(written.sum()) < sum(len(e.ids) for e in enc)  # shared prefixes are written once
    assert int(written.max()) <= cap


@pytest.mark.parametrize("average", [False, True])
def test_packed_logps_and_gradients_equal_the_unpacked_ones(tok, average):
    policy = build_tiny(SMALL, tok, seed=3)
    enc = [train.encode(tok, p, r, 256) for p, r in EXAMPLES]
    ids, attn, mask = train.collate(enc, tok.pad_token_id)
    ref = sequence_logps(train._logits(policy.model, ids, attn), ids, mask, average=average)
    weights = torch.arange(1.0, len(enc) + 1)
    (ref * weights).sum().backward()
    ref_grads = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    rows = plan(enc, list(range(len(enc))), max(len(e.ids) for e in enc))
    p = pack(enc, rows, tok.pad_token_id)
    assert len(rows) < len(enc) and p.ids.numel() < ids.numel()
    got = packed_logps(policy.model, p, average=average)
    order = torch.tensor(p.examples)
    (got * weights[order]).sum().backward()
    assert torch.allclose(got, ref[order], atol=1e-5, rtol=1e-5)
    for a, g in zip(policy.model.parameters(), ref_grads):
        assert torch.allclose(a.grad, g, atol=1e-5, rtol=1e-4)


def test_packed_sft_follows_the_padded_loop(tok):
    c = cfg("model.sft.max_epochs=2", "model.sft.lr=1e-2")
    examples = EXAMPLES + [(p["prompt"], p["chosen"]) for p in PAIRS]
    padded = train.train_sft(build_tiny(SMALL, tok, seed=4), examples, c, packed=False)
    packed = train.train_sft(build_tiny(SMALL, tok, seed=4), examples, c)
    assert len(padded) == len(packed) == 12
    assert packed[0]["train/loss"] == pytest.approx(padded[0]["train/loss"], rel=1e-5)  # same weights, same loss
    assert [h["train/loss"] for h in packed] == pytest.approx([h["train/loss"] for h in padded], rel=2e-3)
    again = train.train_sft(build_tiny(SMALL, tok, seed=4), examples, c)
    assert [h["train/loss"] for h in again] == [h["train/loss"] for h in packed]  # bit-identical rerun


def test_packed_sft_is_part_of_the_resume_key(tok):
    c = cfg()
    policy = build_tiny(SMALL, tok, seed=4)
    ex = EXAMPLES[:3]
    assert train.resume_key(ex, config.to_dict(c), 0, policy.model, True) != train.resume_key(ex, config.to_dict(c), 0, policy.model, False)
