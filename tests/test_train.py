"""Training loops: the LR schedule by hand, accumulation equivalence, the DPO step against hand-computed losses,
and exact resume after a crash between save points."""

import json
import math

import pytest
import torch

from harness import config, train
from harness.batches import pack_pairs
from harness.config import Tiny
from harness.losses import sequence_logps
from harness.models.hf import build_tiny
from harness.models.tokenizer import train_tokenizer

TEXTS = [f"Sort these numbers: {a} {b} {c}\n{min(a, b, c)} {max(a, b, c)}" for a in range(10) for b in range(5)
         for c in range(3)]
SMALL = Tiny(hidden_size=32, num_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
PAIRS = [{"prompt": f"Sort these numbers: {i} {i + 3} {i + 1}\n", "chosen": f"{i} {i + 1} {i + 3}",
          "rejected": f"{i + 3} {i}", "chosen_score": 5.0, "rejected_score": 1.0 + (i % 3)} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def cfg(*overrides):
    return config.load(None, ["model.micro_batch_size=2", "model.global_batch_size=4", "model.optim.lr=1e-2",
                         "model.optim.weight_decay=0.0", "model.optim.sched.warmup_steps=1",
                         "model.optim.sched.constant_steps=0", "model.optim.sched.min_lr=1e-3",
                         "trainer.self_rewarding.max_epochs=2", "trainer.self_rewarding.val_check_interval=100",
                         *overrides], warn=None)


def test_cosine_schedule_hand_worked():
    s = config.Sched(warmup_steps=2, constant_steps=1, min_lr=0.1)
    # total 7: warm-up 0.5, 1.0; cosine over 7-2-1 = 4 steps: 0.1 + 0.9*(1+cos(pi*k/4))/2; then held at min_lr
    got = [train.lr_at(i, 7, 1.0, s) for i in range(7)]
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)),
            0.1]
    assert got == pytest.approx(want, abs=1e-12)


def test_encode_masks_response_and_eos_and_cuts_prompt_from_left(tok):
    enc = train.encode(tok, "Sort these numbers: 1 2 3\n", "1 2 3", 64)
    r = tok("1 2 3", add_special_tokens=False)["input_ids"]
    assert enc.ids[-len(r) - 1:] == r + [tok.eos_token_id] and enc.response_len == len(r) + 1
    short = train.encode(tok, "Sort these numbers: 1 2 3\n", "1 2 3", len(r) + 3)
    assert len(short.ids) == len(r) + 3 and short.mask == [0, 0] + [1] * (len(r) + 1)


def test_micro_batch_split_gives_the_same_step(tok):
    """global 4 as 2 micro-batches of 2 == 1 micro-batch of 4: accumulation is a mean over the global batch."""
    a, b = build_tiny(SMALL, tok, seed=1), build_tiny(SMALL, tok, seed=1)
    ha = train.train_dpo(a, PAIRS[:4], cfg("model.micro_batch_size=2", "trainer.self_rewarding.max_epochs=1"),
                     iteration=1)
    hb = train.train_dpo(b, PAIRS[:4], cfg("model.micro_batch_size=4", "trainer.self_rewarding.max_epochs=1"),
                     iteration=1)
    assert ha[0]["train/loss"] == pytest.approx(hb[0]["train/loss"], rel=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-4)  # lr 1e-2: a wrong mean is ~1e-2 off


def test_first_dpo_step_loss_is_log2_and_metrics_named(tok):
    """At step 1 the policy is the reference: every logratio is 0, so dpo = -logsigmoid(0) = log 2."""
    p = build_tiny(SMALL, tok, seed=2)
    h = train.train_dpo(p, PAIRS[:4], cfg("trainer.self_rewarding.max_epochs=1"), iteration=1)
    assert h[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert h[0]["train/rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-6)
    assert h[0]["train/chosen_generated_rewards"] == 5.0
    assert h[0]["train/rejected_generated_rewards"] == pytest.approx(sum(1.0 + (i % 3) for i in range(4)) / 4)
    for k in ("train/preference_loss", "train/sft_loss", "train/acc", "train/rewards_rejected_mean",
              "train/chosen_lengths", "train/reject_lengths", "grad_norm", "lr"):
        assert k in h[0]


def test_dpo_raises_chosen_over_rejected(tok):
    p = build_tiny(SMALL, tok, seed=3)
    c = cfg("trainer.self_rewarding.max_epochs=6")
    ch = [train.encode(tok, x["prompt"], x["chosen"], 64) for x in PAIRS]
    rj = [train.encode(tok, x["prompt"], x["rejected"], 64) for x in PAIRS]
    before = torch.sub(*train.reference_logps(p, ch, rj, False, 8))
    h = train.train_dpo(p, PAIRS, c, iteration=1)
    after = torch.sub(*train.reference_logps(p, ch, rj, False, 8))
    assert (after - before).mean() > 1.0  # the margin log pi(c) - log pi(r) grew on the training pairs
    assert h[-1]["train/acc"] == 1.0 and h[-1]["train/loss"] < math.log(2)


def test_per_iteration_beta_is_used(tok):
    """beta comes from the iteration's entry. Adam's first step is scale-free, so after it both runs have (almost)
    the same logratios and the implicit rewards beta * logratio differ by the beta ratio 2.0 / 0.1 = 20."""
    c = cfg("trainer.self_rewarding.max_epochs=1", "trainer.self_rewarding.max_iterations=3",
            "model.spin.ref_policy_kl_penalty=[0.1,0.5,2.0]")
    h0 = train.train_dpo(build_tiny(SMALL, tok, seed=4), PAIRS[:8], c, iteration=0)
    h2 = train.train_dpo(build_tiny(SMALL, tok, seed=4), PAIRS[:8], c, iteration=2)
    assert h2[1]["train/rewards_chosen_mean"] / h0[1]["train/rewards_chosen_mean"] == pytest.approx(20, rel=0.02)


def test_resume_after_crash_is_bit_identical(tok, tmp_path, monkeypatch):
    c = cfg("trainer.self_rewarding.save_interval=2", "trainer.self_rewarding.max_epochs=2")
    ref = build_tiny(SMALL, tok, seed=5)
    train.train_dpo(ref, PAIRS, c, iteration=1)

    crashed = build_tiny(SMALL, tok, seed=5)
    real_save, calls = train._save_state, []

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the step-4 save point")

    monkeypatch.setattr(train, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_dpo(crashed, PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    resumed = build_tiny(SMALL, tok, seed=5)  # a fresh process would reload M_t; the state file overrides it
    h = train.train_dpo(resumed, PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    assert h[0]["step"] == 1 and h[-1]["step"] == 6  # history restored, then continued
    for (n, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_corrupt_resume_state_is_reported(tok, tmp_path):
    d = tmp_path / "resume"
    d.mkdir()
    policy = build_tiny(SMALL, tok, seed=6)
    key = train.resume_key(PAIRS, config.to_dict(cfg()), 1, policy.model)  # a state written for these very inputs
    (d / "state.json").write_text(json.dumps({"step": 2, "history": [], "key": key}))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception, match="corrupt resume state"):
        train.train_dpo(policy, PAIRS, cfg(), iteration=1, resume_dir=d)


def _pairs_enc(tok, pairs):
    ch = [train.encode(tok, p["prompt"], p["chosen"], 256) for p in pairs]
    rj = [train.encode(tok, p["prompt"], p["rejected"], 256) for p in pairs]
    return ch, rj


@pytest.mark.parametrize("average", [False, True])
def test_shared_prompt_packing_gives_the_unpacked_logps_and_gradients(tok, average):
    """[prompt, chosen, rejected] in one row (rejected masked off chosen, positions restarted) == two sequences."""
    policy = build_tiny(SMALL, tok, seed=3)
    ch, rj = _pairs_enc(tok, PAIRS[:5])
    weights = torch.arange(1.0, 11.0)
    ids, attn, mask = train.collate(ch + rj, tok.pad_token_id)
    ref = sequence_logps(train._logits(policy.model, ids, attn), ids, mask, average=average)
    (ref * weights).sum().backward()
    ref_grads = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    packed = pack_pairs(ch, rj, tok.pad_token_id)
    assert packed is not None and packed[0].numel() < ids.numel()  # the prompt is computed once
    c, r, sft, c_len, r_len = train.pair_logps(policy.model, ch, rj, tok.pad_token_id, average, sft_average=True)
    (torch.cat([c, r]) * weights).sum().backward()
    assert torch.allclose(torch.cat([c, r]), ref, atol=1e-5, rtol=1e-5)
    for p, g in zip(policy.model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
    assert c_len.tolist() == mask[:5].sum(1).tolist() and r_len.tolist() == mask[5:].sum(1).tolist()
    assert torch.allclose(sft.detach(), sequence_logps(train._logits(policy.model, ids, attn), ids, mask, average=True)[:5],
                          atol=1e-5)


def test_packing_falls_back_when_prompts_differ(tok):
    ch, rj = _pairs_enc(tok, PAIRS[:2])
    rj[1] = train.encode(tok, "Sort these numbers: 9 9 9\n", "9 9 9", 256)
    assert pack_pairs(ch, rj, tok.pad_token_id) is None
    policy = build_tiny(SMALL, tok, seed=3)
    c, r, *_ = train.pair_logps(policy.model, ch, rj, tok.pad_token_id, False)
    ids, attn, mask = train.collate(ch + rj, tok.pad_token_id)
    assert torch.allclose(torch.cat([c, r]), sequence_logps(train._logits(policy.model, ids, attn), ids, mask), atol=1e-6)


def crash_at_first_save(policy, c, resume_dir, monkeypatch):
    """train_dpo on `policy` killed right after its first save point (as SIGKILL would leave it)."""
    real_save = train._save_state

    def crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_dpo(policy, PAIRS, c, iteration=1, resume_dir=resume_dir)
    monkeypatch.setattr(train, "_save_state", real_save)


def test_reference_logps_are_cached_on_disk_and_not_recomputed_on_resume(tok, tmp_path, monkeypatch):
    c = cfg("trainer.self_rewarding.save_interval=2")
    crash_at_first_save(build_tiny(SMALL, tok, seed=5), c, tmp_path / "resume", monkeypatch)
    assert train.ref_cache_path(tmp_path / "resume").exists()
    monkeypatch.setattr(train, "reference_logps", lambda *a, **k: pytest.fail("reference log-probs recomputed"))
    h = train.train_dpo(build_tiny(SMALL, tok, seed=5), PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    assert h[0]["step"] == 1 and h[-1]["step"] == 6


def test_resume_state_of_other_inputs_is_ignored(tok, tmp_path, monkeypatch):
    """A crash, then a changed param: the stale resume state and reference cache must not be used."""
    c = cfg("trainer.self_rewarding.save_interval=2")
    crash_at_first_save(build_tiny(SMALL, tok, seed=5), c, tmp_path / "resume", monkeypatch)
    changed = cfg("trainer.self_rewarding.save_interval=2", "model.spin.ref_policy_kl_penalty=0.3")
    fresh = build_tiny(SMALL, tok, seed=5)
    train.train_dpo(fresh, PAIRS, changed, iteration=1)
    after_crash = build_tiny(SMALL, tok, seed=5)
    h = train.train_dpo(after_crash, PAIRS, changed, iteration=1, resume_dir=tmp_path / "resume")
    assert [r["step"] for r in h if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    for (n, a), b in zip(fresh.model.state_dict().items(), after_crash.model.state_dict().values()):
        assert torch.equal(a, b), n


class _StepCounter:
    """Counts optimizer steps through torch's global step hook: independent of what the loop reports."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(lambda *a: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _record_batches(monkeypatch) -> list:
    """The chosen token ids of every training micro-batch (the data order), in call order."""
    seen, real = [], train.pair_logps

    def spy(model, ch, rj, *a, **k):
        if torch.is_grad_enabled():  # training; the reference pass runs under inference_mode
            seen.append([c.ids for c in ch])
        return real(model, ch, rj, *a, **k)

    monkeypatch.setattr(train, "pair_logps", spy)
    return seen


def _state(d):
    from safetensors.torch import load_file

    opt = torch.load(d / "optimizer.pt", weights_only=True)
    return json.loads((d / "state.json").read_text()), load_file(str(d / "model.safetensors")), opt


def test_killed_run_recomputes_only_the_steps_after_its_save_point(tok, tmp_path, monkeypatch, capsys):
    """6 steps, save points at 2 and 4, killed right after the save at step 2: the rerun computes steps 3..6 only
    (4 optimizer steps, counted by torch's step hook), on the batches the uninterrupted run used at steps 3..6, and
    its state at the step-4 save point (weights, Adam moments, history) equals the uninterrupted run's."""
    c = cfg("trainer.self_rewarding.save_interval=2", "trainer.self_rewarding.max_epochs=2")
    batches = _record_batches(monkeypatch)
    with _StepCounter() as full:
        ref = build_tiny(SMALL, tok, seed=5)
        train.train_dpo(ref, PAIRS, c, iteration=1, resume_dir=tmp_path / "ref")  # its last save point: step 4
    assert full.n == 6 and len(batches) == 12  # 2 micro-batches per step
    ref_batches = list(batches)
    real_save = train._save_state

    def crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt("killed after the step-2 save point")

    monkeypatch.setattr(train, "_save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_dpo(build_tiny(SMALL, tok, seed=5), PAIRS, c, iteration=1, resume_dir=tmp_path / "run")
    monkeypatch.setattr(train, "_save_state", real_save)
    batches.clear()
    capsys.readouterr()
    with _StepCounter() as rerun:
        resumed = build_tiny(SMALL, tok, seed=5)
        h = train.train_dpo(resumed, PAIRS, c, iteration=1, resume_dir=tmp_path / "run")
    assert rerun.n == 4 and h.steps_computed == 4 and h.resumed_from == 2 and h.total_steps == 6
    assert batches == ref_batches[4:]  # the data order continues where it stopped
    note = f"resumed from step 2 of 6 ({tmp_path / 'run'})"
    assert h.resume_note == note and note in capsys.readouterr().err
    (js, ws, opt), (js2, ws2, opt2) = _state(tmp_path / "ref"), _state(tmp_path / "run")
    assert js["step"] == js2["step"] == 4 and js["history"] == js2["history"]
    assert all(torch.equal(ws[k], ws2[k]) for k in ws)
    for sa, sb in zip(opt["state"].values(), opt2["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    for (n, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_sft_resumes_too(tok, tmp_path, monkeypatch):
    c = cfg("trainer.self_rewarding.save_interval=1", "model.sft.max_epochs=2")
    examples = [(p["prompt"], p["chosen"]) for p in PAIRS]
    _crash_after_saves = train._save_state

    def crash(*a, **k):
        _crash_after_saves(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_sft(build_tiny(SMALL, tok, seed=7), examples, c, resume_dir=tmp_path / "r")
    monkeypatch.setattr(train, "_save_state", _crash_after_saves)
    with _StepCounter() as rerun:
        h = train.train_sft(build_tiny(SMALL, tok, seed=7), examples, c, resume_dir=tmp_path / "r")
    assert (h.resumed_from, h.total_steps, rerun.n) == (1, 6, 5)


def test_state_written_by_other_training_code_is_not_reused(tok, tmp_path, monkeypatch):
    c = cfg("trainer.self_rewarding.save_interval=2")
    monkeypatch.setattr(train, "code_version", lambda: "an older train.py")
    crash_at_first_save(build_tiny(SMALL, tok, seed=5), c, tmp_path / "resume", monkeypatch)
    monkeypatch.undo()
    with _StepCounter() as rerun:
        h = train.train_dpo(build_tiny(SMALL, tok, seed=5), PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    assert rerun.n == 6 and h.resumed_from is None


def test_limit_val_batches_zero_validates_nothing(tok):
    policy = build_tiny(SMALL, tok, seed=8)
    val = [(p["prompt"], p["chosen"]) for p in PAIRS]
    h = train.train_dpo(policy, PAIRS[:4], cfg("trainer.self_rewarding.limit_val_batches=0",
                                           "trainer.self_rewarding.val_check_interval=1"), iteration=1,
                    validation=val)
    assert h and not any("val/loss" in row for row in h)


def test_bf16_precision_trains_and_generates_in_bf16(tok, monkeypatch):
    """trainer.precision=bf16: every linear layer computes in bf16 in training and in generation; weights, gradients
    and Adam states stay fp32 (master weights); the loss differs from fp32 by bf16 rounding only."""
    from harness.config import LengthParams, SamplingParams
    from harness.generation.sampler import generate

    seen = []
    p32, p16 = build_tiny(SMALL, tok, seed=9), build_tiny(SMALL, tok, seed=9)
    p16.precision = "bf16"
    for m in p16.model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, i, out: seen.append(out.dtype))
    h32 = train.train_dpo(p32, PAIRS[:4], cfg("trainer.self_rewarding.max_epochs=1"), iteration=1)
    h16 = train.train_dpo(p16, PAIRS[:4], cfg("trainer.self_rewarding.max_epochs=1", "trainer.precision=bf16"),
                      iteration=1)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in p16.model.parameters())
    assert h16[0]["train/loss"] == pytest.approx(h32[0]["train/loss"], abs=0.02)
    seen.clear()
    real_linear = torch.nn.functional.linear  # the generation fast path calls F.linear on the weights directly

    def linear(*a, **k):
        out = real_linear(*a, **k)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    out = generate(p16, ["Sort these numbers: 1 3 2\n"], num_samples=2, sampling_params=SamplingParams(),
                   length_params=LengthParams(max_length=5), seed_parts=[(1,)])
    assert len(out[0]) == 2 and all(o["num_tokens"] >= 1 for o in out[0])
    assert seen and set(seen) == {torch.bfloat16}


def test_encoder_seq_length_caps_the_training_sequences(tok):
    """model.encoder_seq_length is the context: a 4-token context keeps at most 3 response tokens (+ 1 of prompt)."""
    full = train.train_dpo(build_tiny(SMALL, tok, seed=10), PAIRS[:4], cfg("trainer.self_rewarding.max_epochs=1"),
                       iteration=1)
    cut = train.train_dpo(build_tiny(SMALL, tok, seed=10), PAIRS[:4],
                      cfg("trainer.self_rewarding.max_epochs=1", "model.encoder_seq_length=4"), iteration=1)
    assert full[0]["train/chosen_lengths"] > 3 and cut[0]["train/chosen_lengths"] == 3
