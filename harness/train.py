"""The SFT and DPO loops: micro/global batches with accumulation, AdamW, cosine LR, clipping, exact resume.

One visible loop (`_run`) serves both: a step function turns a micro-batch into (summed loss, metrics). The reference
model is the policy at the start of the iteration (M_t), so its log-probs are computed once, before the first step.
Knows nothing of DVC or MLflow: it returns the metric history and the stage writes/logs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import config as C
from harness.determinism import derive_seed
from harness.io import DataError, atomic_path, read_json
from harness.losses import (
    consistency_regularized_loss,
    implicit_rewards,
    preference_loss,
    sequence_logps,
    sft_loss,
)


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 on response tokens (incl. EOS), 0 on the prompt

    @property
    def response_len(self) -> int:
        return sum(self.mask)


def encode(tokenizer, prompt: str, response: str, max_len: int) -> Encoded:
    """Prompt and response tokenized apart (as generation sees them), EOS appended; the prompt is cut from the left."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = r[: max_len - 1]
    p = p[-(max_len - len(r)):]
    return Encoded(p + r, [0] * len(p) + [1] * len(r))


def collate(seqs: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attn[i, : len(s.ids)] = 1
        mask[i, : len(s.ids)] = torch.tensor(s.mask, dtype=torch.float32)
    return ids, attn, mask


def lr_at(step: int, total: int, lr: float, sched: C.Sched) -> float:
    """NeMo's CosineAnnealing: linear warm-up, cosine from lr to min_lr, then constant_steps at min_lr."""
    if sched.name == "constant":
        return lr
    if step < sched.warmup_steps:
        return lr * (step + 1) / sched.warmup_steps
    decay = max(1, total - sched.warmup_steps - sched.constant_steps)
    progress = min(1.0, (step - sched.warmup_steps) / decay)
    return sched.min_lr + (lr - sched.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _logits(model, ids, attn) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=attn).logits


# ----------------------------------------------------------------------------------------------------- shared prompts
def pack_pairs(ch, rj, pad_id: int, dtype=torch.float32):
    """One row per pair: [prompt, chosen response, rejected response]; the rejected response attends to the prompt
    and itself only, at the positions it has in its own sequence, so each response's log-probs are those of the
    unpacked (prompt + response) sequence while the shared prompt is computed once. None when a pair's prompts
    differ (left-truncation cut them differently) or a prompt is empty (its first response token is not scored)."""
    spans = []
    for c, r in zip(ch, rj):
        lp, lpr = c.mask.index(1), r.mask.index(1)
        if lp == 0 or c.ids[:lp] != r.ids[:lpr]:
            return None
        spans.append((lp, len(c.ids) - lp, len(r.ids) - lpr))
    b_n, t_n = len(spans), max(sum(s) for s in spans)
    tc, tr = max(s[1] for s in spans), max(s[2] for s in spans)
    ids = torch.full((b_n, t_n), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b_n, t_n), dtype=torch.long)
    allowed = torch.eye(t_n, dtype=torch.bool).repeat(b_n, 1, 1)  # padding rows see themselves: no empty softmax
    idx = {k: torch.zeros((b_n, n), dtype=torch.long) for k, n in (("cp", tc), ("ct", tc), ("rp", tr), ("rt", tr))}
    cm, rm = torch.zeros((b_n, tc), dtype=torch.bool), torch.zeros((b_n, tr), dtype=torch.bool)
    for b, ((lp, lc, lr), c, r) in enumerate(zip(spans, ch, rj)):
        n = lp + lc + lr
        ids[b, :n] = torch.tensor(c.ids + r.ids[lp:])
        position_ids[b, :n] = torch.cat([torch.arange(lp + lc), torch.arange(lp, lp + lr)])
        causal = torch.ones((n, n), dtype=torch.bool).tril()
        causal[lp + lc:, lp:lp + lc] = False  # the rejected response never sees the chosen one
        allowed[b, :n, :n] = causal
        idx["cp"][b, :lc] = torch.arange(lp - 1, lp - 1 + lc)  # logits at t predict token t + 1
        idx["ct"][b, :lc] = ids[b, lp:lp + lc]
        idx["rp"][b, :lr] = torch.cat([torch.tensor([lp - 1]), torch.arange(lp + lc, lp + lc + lr - 1)])
        idx["rt"][b, :lr] = ids[b, lp + lc:n]
        cm[b, :lc], rm[b, :lr] = True, True
    mask = torch.zeros((b_n, 1, t_n, t_n), dtype=dtype).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return ids, position_ids, mask, (idx["cp"], idx["ct"], cm), (idx["rp"], idx["rt"], rm)


def _gathered_logps(logits, pred, tgt, mask, average: bool):
    """Masked sum (or mean) of log p(tgt | logits at pred) per row."""
    rows = []
    for lg, p, t, m in zip(logits, pred, tgt, mask):
        sel = lg[p].float()
        lp = sel.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(sel, dim=-1)
        rows.append(torch.where(m, lp, torch.zeros_like(lp)).sum())
    total = torch.stack(rows)
    return total / mask.sum(1).clamp(min=1) if average else total


def pair_logps(model, ch: list[Encoded], rj: list[Encoded], pad_id: int, average: bool,
               sft_average: bool | None = None):
    """(chosen logps, rejected logps, chosen logps for the SFT term or None, chosen and rejected lengths) of a
    micro-batch of pairs: packed (the prompt computed once per pair) when possible, else one padded batch."""
    packed = pack_pairs(ch, rj, pad_id, next(model.parameters()).dtype)
    if packed is not None:
        ids, pos, amask, c, r = packed
        logits = model(input_ids=ids, attention_mask=amask, position_ids=pos).logits
        lc, lr = _gathered_logps(logits, *c, average), _gathered_logps(logits, *r, average)
        sft = None if sft_average is None else lc if sft_average == average else _gathered_logps(logits, *c, sft_average)
        return lc, lr, sft, c[2].sum(1).float(), r[2].sum(1).float()
    n = len(ch)
    ids, attn, mask = collate(ch + rj, pad_id)
    logits = _logits(model, ids, attn)
    logps = sequence_logps(logits, ids, mask, average=average)
    sft = None if sft_average is None else logps[:n] if sft_average == average else sequence_logps(
        logits[:n], ids[:n], mask[:n], average=sft_average)
    return logps[:n], logps[n:], sft, mask[:n].sum(1), mask[n:].sum(1)


# ----------------------------------------------------------------------------------------------------- resume state
def _save_state(path: Path, model, opt, step: int, history: list, extra: dict[str, torch.Tensor], key: str) -> None:
    from safetensors.torch import save_file, save_model

    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        if extra:
            save_file(extra, str(tmp / "extra.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history, "key": key}))


def _load_state(path: Path, model, opt) -> tuple[int, list, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file, load_model

    try:
        state = read_json(path / "state.json")
        load_model(model, str(path / "model.safetensors"))
        # weights_only: the optimizer file is tensors and numbers; never unpickle arbitrary objects.
        opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type; any failure means a bad file
        raise DataError(f"{path}: corrupt resume state ({e}); delete it to restart the stage") from None
    return state["step"], state["history"], extra


# ----------------------------------------------------------------------------------------------------- the loop
def _run(policy, n_items: int, step_fn: Callable, cfg: C.Config, *, lr: float, epochs: int, iteration: int,
         shuffle: bool, resume_dir: Path | None, val_fn: Callable | None, extra_state: dict | None = None,
         phase: str = "train", max_steps: int = -1, keep_batches: bool = False, key: str = "",
         lengths: list[int] | None = None) -> list[dict]:
    """Optimizer steps over global batches of item indices; returns one metrics dict per step (+ val entries)."""
    model, m, sr = policy.model, cfg.model, cfg.trainer.self_rewarding
    gbs, mbs = m.global_batch_size, m.micro_batch_size
    steps_per_epoch = max(1, math.ceil(math.ceil(n_items / gbs) * sr.limit_train_batches))
    total = epochs * steps_per_epoch if max_steps == -1 else min(max_steps, epochs * steps_per_epoch)
    val_every = max(1, round(total * sr.val_check_interval)) if sr.val_check_interval < 1 else int(sr.val_check_interval)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(m.optim.betas), eps=m.optim.eps,
                            weight_decay=m.optim.weight_decay)
    start, history = 0, []
    if resume_dir is not None and (resume_dir / "state.json").exists() and (
            read_json(resume_dir / "state.json").get("key") == key):  # else: written for other inputs, ignored
        start, history, saved = _load_state(resume_dir, model, opt)
        if extra_state is not None:
            extra_state.update(saved)
    model.train()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(n_items))
        if shuffle:  # the order of epoch e is a pure function of (seed, iteration, phase, e): resume-safe
            rng = random.Random(derive_seed(cfg.seed, iteration, phase, epoch))
            if keep_batches:  # shuffle whole global batches: their mix of judge pairs is a bound set by pairs
                full = n_items // gbs  # a short last batch stays last, so slicing by gbs keeps every batch whole
                blocks = [order[i * gbs:(i + 1) * gbs] for i in range(full)]
                rng.shuffle(blocks)
                order = [i for b in blocks for i in b] + order[full * gbs:]
            else:
                rng.shuffle(order)
                if lengths is not None:
                    order = group_by_length(order, lengths, gbs, rng)
        batch = order[k * gbs:(k + 1) * gbs]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, m.optim.sched)
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for i in range(0, len(batch), mbs):
            loss, metrics = step_fn(batch[i:i + mbs], len(batch))
            loss.backward()
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
        clip = sr.gradient_clip_val if sr.gradient_clip_val > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        row = {"step": step + 1, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm)}
        row.update({key: v / len(batch) for key, v in sums.items()})
        history.append(row)
        if val_fn is not None and ((step + 1) % val_every == 0 or step + 1 == total):
            model.eval()
            history.append({"step": step + 1, **val_fn()})
            model.train()
        if resume_dir is not None and (step + 1) % sr.save_interval == 0 and step + 1 < total:
            _save_state(resume_dir, model, opt, step + 1, history, extra_state or {}, key)
    model.eval()
    return history


def group_by_length(order: list[int], lengths: list[int], gbs: int, rng: random.Random, chunk: int = 8) -> list[int]:
    """Shuffled order regrouped so each global batch holds items of similar length: within consecutive chunks of
    `chunk` global batches, items are sorted by length and cut into batches, then all batches are shuffled (a short
    last batch stays last). A batch is padded to its longest item, so mixing 40- and 150-token examples (answers,
    judgements, meta-judgements) would spend a third of SFT's compute on padding."""
    size = gbs * chunk
    batches = []
    for i in range(0, len(order), size):
        part = sorted(order[i:i + size], key=lambda j: lengths[j])
        batches += [part[k:k + gbs] for k in range(0, len(part), gbs)]
    full = [b for b in batches if len(b) == gbs]
    rng.shuffle(full)
    return [j for b in full for j in b] + [j for b in batches if len(b) < gbs for j in b]


def _val_sft(policy, val: list[Encoded], cfg: C.Config) -> Callable:
    """Mean token NLL of gold answers on the validation set: val/loss."""
    n = max(1, math.ceil(len(val) * cfg.trainer.self_rewarding.limit_val_batches)) if val else 0

    def fn() -> dict:
        tot, cnt = 0.0, 0.0
        with torch.inference_mode():
            for i in range(0, n, cfg.model.micro_batch_size * 2):
                ids, attn, mask = collate(val[i:i + cfg.model.micro_batch_size * 2], policy.tokenizer.pad_token_id)
                nll = sft_loss(_logits(policy.model, ids, attn), ids, mask, average=False)
                tot += float(nll.sum())
                cnt += float(mask[:, 1:].sum())
        return {"val/loss": tot / max(cnt, 1.0)}

    return fn if n else None


def train_sft(policy, examples: list[tuple[str, str]], cfg: C.Config, *, validation: list[tuple[str, str]] = (),
              iteration: int = 0, resume_dir: Path | None = None) -> list[dict]:
    """Iteration 0: NLL of (prompt, response) examples (gold answers and judge targets), token-averaged per batch."""
    max_len = cfg.model.data.sft_ds.max_seq_length
    enc = [encode(policy.tokenizer, p, r, max_len) for p, r in examples]
    val = [encode(policy.tokenizer, p, r, cfg.model.data.validation_ds.max_seq_length) for p, r in validation]
    pad = policy.tokenizer.pad_token_id

    def step_fn(idx: list[int], batch_size: int):
        ids, attn, mask = collate([enc[i] for i in idx], pad)
        nll = sft_loss(_logits(policy.model, ids, attn), ids, mask, average=True)
        # sum of per-sample means / global batch size == the mean over the global batch, whatever the micro split
        loss = nll.sum() / batch_size
        return loss, {"train/loss": float(nll.detach().sum())}

    return _run(policy, len(enc), step_fn, cfg, lr=cfg.model.sft.lr, epochs=cfg.model.sft.max_epochs, iteration=iteration,
                shuffle=cfg.model.data.sft_ds.shuffle, resume_dir=resume_dir,
                val_fn=_val_sft(policy, val, cfg), phase="sft", lengths=[len(e.ids) for e in enc],
                key=resume_key(examples, C.to_dict(cfg), iteration, policy.model))


def reference_logps(policy, ch: list[Encoded], rj: list[Encoded], average: bool, batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of chosen and rejected responses under the policy as it is now (the reference M_t)."""
    out_c, out_r = [], []
    with torch.inference_mode():
        for i in range(0, len(ch), batch):
            c, r, *_ = pair_logps(policy.model, ch[i:i + batch], rj[i:i + batch], policy.tokenizer.pad_token_id,
                                  average)
            out_c.append(c)
            out_r.append(r)
    return (torch.cat(out_c), torch.cat(out_r)) if out_c else (torch.zeros(0), torch.zeros(0))


def resume_key(*parts) -> str:
    """What a resume state belongs to: a state written for other inputs (a crash, then a changed param) is ignored."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.nn.Module):
            for name, t in sorted(p.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def ref_cache_path(resume_dir: Path) -> Path:
    return resume_dir.with_name(resume_dir.name + ".ref_logps.safetensors")


def train_dpo(policy, pairs: list[dict], cfg: C.Config, *, iteration: int, validation: list[tuple[str, str]] = (),
              resume_dir: Path | None = None) -> list[dict]:
    """One self-rewarding iteration: preference loss on {prompt, chosen, rejected, chosen_score, rejected_score}.

    The reference is the policy as loaded (M_t); its log-probs are computed once and cached on disk next to the
    resume state, so no second model is ever in memory and a resumed stage does not recompute them.
    """
    spin, max_len = cfg.model.spin, cfg.model.data.train_ds.max_seq_length
    beta = C.schedule(spin.ref_policy_kl_penalty, iteration)
    avg, sft_avg = spin.preference_average_log_probs, C.sft_average_log_probs(spin)
    tok, pad = policy.tokenizer, policy.tokenizer.pad_token_id
    ch = [encode(tok, p["prompt"], p["chosen"], max_len) for p in pairs]
    rj = [encode(tok, p["prompt"], p["rejected"], max_len) for p in pairs]
    val = [encode(tok, p, r, cfg.model.data.validation_ds.max_seq_length) for p, r in validation]
    key = resume_key(pairs, C.to_dict(cfg), iteration, policy.model)
    state: dict[str, torch.Tensor] = {}
    cache = ref_cache_path(resume_dir) if resume_dir is not None else None
    if cache is not None and cache.exists():  # computed before a crash, for these very inputs
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                state = {k: f.get_tensor(k) for k in ("ref_chosen", "ref_rejected")}
    if not state:
        state["ref_chosen"], state["ref_rejected"] = reference_logps(policy, ch, rj, avg, cfg.model.micro_batch_size)
        if cache is not None:  # on disk at once: a resumed stage never recomputes them
            from safetensors.torch import save_file

            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                save_file(state, str(tmp), metadata={"key": key})
    scores = torch.tensor([[p["chosen_score"], p["rejected_score"]] for p in pairs], dtype=torch.float32)
    # CREAM: pairs carry a consistency rate (judge pairs and plain runs do not: 1, the unregularized loss)
    cream = any("consistency" in p for p in pairs)
    consistency = torch.tensor([p.get("consistency", 1.0) for p in pairs], dtype=torch.float32)

    def step_fn(idx: list[int], batch_size: int):
        n = len(idx)
        c_logps, r_logps, sft_logps, c_len, r_len = pair_logps(
            policy.model, [ch[i] for i in idx], [rj[i] for i in idx], pad, avg,
            sft_avg if spin.sft_loss_weight else None)  # chosen and rejected in one forward
        c_ratio = c_logps - state["ref_chosen"][idx]
        r_ratio = r_logps - state["ref_rejected"][idx]
        kw = {"chosen_logratio": c_ratio, "rejected_logratio": r_ratio, "chosen_score": scores[idx, 0],
              "rejected_score": scores[idx, 1], "beta": beta, "gt_reward_scale": spin.gt_reward_scale}
        pref = (consistency_regularized_loss(spin.preference_loss, consistency[idx], **kw) if cream
                else preference_loss(spin.preference_loss, **kw))
        sft = -sft_logps if spin.sft_loss_weight else torch.zeros(n)
        per_sample = spin.preference_loss_weight * pref + spin.sft_loss_weight * sft
        rc, rr = implicit_rewards(c_ratio.detach(), r_ratio.detach(), beta)
        metrics = {
            "train/loss": float(per_sample.detach().sum()), "train/preference_loss": float(pref.detach().sum()),
            "train/sft_loss": float(sft.detach().sum()), "train/acc": float((rc > rr).float().sum()),
            "train/rewards_chosen_mean": float(rc.sum()), "train/rewards_rejected_mean": float(rr.sum()),
            "train/chosen_lengths": float(c_len.sum()), "train/reject_lengths": float(r_len.sum()),
            "train/chosen_generated_rewards": float(scores[idx, 0].sum()),
            "train/rejected_generated_rewards": float(scores[idx, 1].sum()),
        }
        return per_sample.sum() / batch_size, metrics

    return _run(policy, len(pairs), step_fn, cfg, lr=cfg.model.optim.lr, epochs=cfg.trainer.self_rewarding.max_epochs,
                iteration=iteration, shuffle=cfg.model.data.train_ds.shuffle, resume_dir=resume_dir,
                val_fn=_val_sft(policy, val, cfg), phase="dpo", key=key,
                max_steps=cfg.trainer.self_rewarding.max_steps, keep_batches=True)
