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
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from harness import config, parallel
from harness.batches import Encoded, collate, encode, pair_logps
from harness.determinism import derive_seed
from harness.io import DataError, atomic_path, read_json
from harness.losses import (
    consistency_regularized_loss,
    implicit_rewards,
    preference_loss,
    sft_loss,
)
from harness.packing import pack, packed_logps, plan
from harness.progress import progress


class Diverged(DataError):
    """Training reached a non-finite loss, gradient or weight (a learning rate too large for the data, usually)."""


def lr_at(step: int, total: int, lr: float, sched: config.Sched) -> float:
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
class History(list):
    """The metric rows of one training stage, and how much of it this process computed.

    resumed_from: the optimizer step restored from a resume state (None: started at step 0); steps_computed: the
    optimizer steps run here; total_steps: the stage's steps in all.
    """

    def __init__(self, rows=(), *, resumed_from: int | None = None, steps_computed: int = 0, total_steps: int = 0,
                 resume_dir: Path | None = None):
        super().__init__(rows)
        self.resumed_from, self.steps_computed, self.total_steps = resumed_from, steps_computed, total_steps
        self.resume_dir = resume_dir

    @property
    def resume_note(self) -> str | None:
        """'resumed from step k of n (<resume dir>)', or None for a stage that started from step 0."""
        if self.resumed_from is None:
            return None
        return f"resumed from step {self.resumed_from} of {self.total_steps} ({self.resume_dir})"


def _run(policy, n_items: int, step_fn: Callable, cfg: config.Config, *, lr: float, epochs: int, iteration: int,
         shuffle: bool, resume_dir: Path | None, val_fn: Callable | None, extra_state: dict | None = None,
         phase: str = "train", max_steps: int = -1, keep_batches: bool = False, key: str = "",
         micro_batches: Callable | None = None) -> History:
    """Optimizer steps over global batches of item indices; returns one metrics dict per step (+ val entries).

    micro_batches(global batch) -> the micro-batches step_fn receives (default: consecutive slices of
    micro_batch_size items; packed SFT passes rows of packed examples instead).

    With resume_dir, the state (weights, optimizer, history, extra tensors) is saved every save_interval steps under
    `key`; a rerun with the same key continues from the last save point, announced on stderr."""
    model, m, sr = policy.model, cfg.model, cfg.trainer.self_rewarding
    gbs, mbs = m.global_batch_size, m.micro_batch_size
    steps_per_epoch = max(1, math.ceil(math.ceil(n_items / gbs) * sr.limit_train_batches))
    total = epochs * steps_per_epoch if max_steps == -1 else min(max_steps, epochs * steps_per_epoch)
    val_every = max(1, round(total * sr.val_check_interval)) if sr.val_check_interval < 1 else int(sr.val_check_interval)
    opt = parallel.optimizer(model, lr=lr, betas=tuple(m.optim.betas), eps=m.optim.eps, weight_decay=m.optim.weight_decay)
    start, history, resumed = 0, [], None
    if resume_dir is not None and _saved_key(resume_dir) == key:  # else: written for other inputs, ignored
        start, history, saved = _load_state(resume_dir, model, opt)
        if extra_state is not None:
            extra_state.update(saved)
        resumed = start
        print(f"harness: {phase}: resumed from step {start} of {total} ({resume_dir})", file=sys.stderr, flush=True)
    model.train()
    bar = progress(total - start, f"{phase} iter {iteration}" + (f" (from step {start})" if start else ""), "step")
    t0, items = time.perf_counter(), 0
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
        batch = order[k * gbs:(k + 1) * gbs]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, m.optim.sched)
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        mine = parallel.shard(batch)  # this data-parallel rank's part of the global batch (all of it with one rank)
        micro = micro_batches(mine) if micro_batches else [mine[i:i + mbs] for i in range(0, len(mine), mbs)]
        for mb in micro:
            with policy.autocast():  # forward only: backward follows the forward's dtypes
                loss, metrics = step_fn(mb, len(batch))
            loss.backward()
            for name, v in metrics.items():
                sums[name] = sums.get(name, 0.0) + v
        clip = sr.gradient_clip_val if sr.gradient_clip_val > 0 else float("inf")
        grad_norm = opt.clip_grad_norm_(clip)  # gradients summed over data-parallel ranks first
        try:
            opt.step()
        except RuntimeError as e:  # torch: "value cannot be converted to type float without overflow"
            if "overflow" not in str(e):
                raise
            _check_finite(phase, step, total, lr, {"step size": float("inf")})
        row = {"step": step + 1, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm)}
        row.update({name: v / len(batch) for name, v in parallel.all_sum(sums).items()})
        # Both summed over ranks, so every rank stops together, before anything is saved.
        _check_finite(phase, step, total, lr, {"loss": row.get("train/loss", 0.0), "gradient norm": row["grad_norm"]})
        history.append(row)
        items += len(batch)
        bar.update(1, loss=row.get("train/loss", float("nan")), items_per_s=items / (time.perf_counter() - t0))
        if val_fn is not None and ((step + 1) % val_every == 0 or step + 1 == total):
            model.eval()
            history.append({"step": step + 1, **val_fn()})
            model.train()
        if resume_dir is not None and (step + 1) % sr.save_interval == 0 and step + 1 < total:
            _save_state(resume_dir, model, opt, step + 1, history, extra_state or {}, key)
    bar.close()
    bad = next(((n, p.detach()) for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        _check_finite(phase, total - 1, total, lr, {f"weight {bad[0]}": float(bad[1][~torch.isfinite(bad[1])][0])})
    model.eval()
    return History(history, resumed_from=resumed, steps_computed=total - start, total_steps=total,
                   resume_dir=resume_dir)


def _saved_key(resume_dir: Path) -> str | None:
    from harness.io import recover

    recover(resume_dir)  # a crash between the two renames of a directory replace left only its backup
    try:
        return read_json(resume_dir / "state.json").get("key")
    except (DataError, AttributeError):
        return None  # missing or unreadable: no usable state, start over


def _check_finite(phase: str, step: int, total: int, lr: float, values: dict[str, float]) -> None:
    """Stop a diverged run before anything is saved: a NaN model written with exit 0 poisons every later stage."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        key = "model.sft.lr" if phase == "sft" else "model.optim.lr"
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise Diverged(f"{phase} step {step + 1} of {total}: {what}: training diverged ({key}={lr:g}); "
                       "no model was written")


def val_sft(policy, val: list[Encoded], cfg: config.Config) -> Callable:
    """Mean token NLL of gold answers on the validation set: val/loss."""
    n = math.ceil(len(val) * cfg.trainer.self_rewarding.limit_val_batches)  # limit_val_batches=0: no validation

    def fn() -> dict:
        tot, cnt = 0.0, 0.0
        with torch.inference_mode(), policy.autocast():
            for i in range(0, n, cfg.model.micro_batch_size * 2):
                ids, attn, mask = collate(val[i:i + cfg.model.micro_batch_size * 2], policy.tokenizer.pad_token_id)
                nll = sft_loss(_logits(policy.model, ids, attn), ids, mask, average=False)
                tot += float(nll.sum())
                cnt += float(mask[:, 1:].sum())
        return {"val/loss": tot / max(cnt, 1.0)}

    return fn if n else None


def train_sft(policy, examples: list[tuple[str, str]], cfg: config.Config, *, validation: list[tuple[str, str]] = (),
              iteration: int = 0, resume_dir: Path | None = None, packed: bool = True) -> History:
    """Iteration 0: NLL of (prompt, response) examples (gold answers and judge targets), the mean over each global
    batch of every example's token-averaged NLL.

    packed: the global batch's examples go into rows as long as its longest example, those sharing a prefix holding
    it once, each attending only to its own tokens at its own positions (harness.packing), micro_batch_size rows
    per forward: the same loss as padded micro-batches of micro_batch_size examples (packed=False), without their
    padding and repeated prefixes.
    """
    max_len = config.seq_len(cfg, cfg.model.data.sft_ds)
    enc = [encode(policy.tokenizer, p, r, max_len) for p, r in examples]
    val = [encode(policy.tokenizer, p, r, config.seq_len(cfg, cfg.model.data.validation_ds)) for p, r in validation]
    pad, mbs = policy.tokenizer.pad_token_id, cfg.model.micro_batch_size

    def rows_of(batch: list[int]) -> list[list[list[list[int]]]]:
        # rows as long as the batch's longest example: no longer than its padded micro-batches, and attention
        # (quadratic in the row length) no wider than needed
        rows = plan(enc, batch, max(len(enc[i].ids) for i in batch))
        return [rows[i:i + mbs] for i in range(0, len(rows), mbs)]

    def packed_step(rows: list[list[list[int]]], batch_size: int):
        packed = pack(enc, rows, pad, next(policy.model.parameters()).dtype, device=parallel.current().device)
        nll = -packed_logps(policy.model, packed, average=True)
        return nll.sum() / batch_size, {"train/loss": float(nll.detach().sum())}

    def step_fn(idx: list[int], batch_size: int):
        ids, attn, mask = collate([enc[i] for i in idx], pad)
        nll = sft_loss(_logits(policy.model, ids, attn), ids, mask, average=True)
        # sum of per-sample means / global batch size == the mean over the global batch, whatever the micro split
        loss = nll.sum() / batch_size
        return loss, {"train/loss": float(nll.detach().sum())}

    return _run(policy, len(enc), packed_step if packed else step_fn, cfg, lr=cfg.model.sft.lr,
                epochs=cfg.model.sft.max_epochs, iteration=iteration,
                shuffle=cfg.model.data.sft_ds.shuffle, resume_dir=resume_dir,
                val_fn=val_sft(policy, val, cfg), phase="sft", micro_batches=rows_of if packed else None,
                key=resume_key(examples, config.to_dict(cfg), iteration, policy.model, packed))


def reference_logps(policy, ch: list[Encoded], rj: list[Encoded], average: bool, batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of chosen and rejected responses under the policy as it is now (the reference M_t)."""
    out_c, out_r = [], []
    bar = progress(len(ch), "reference log-probs", "pair")
    with torch.inference_mode(), policy.autocast():
        for i in range(0, len(ch), batch):
            c, r, *_ = pair_logps(policy.model, ch[i:i + batch], rj[i:i + batch], policy.tokenizer.pad_token_id,
                                  average)
            out_c.append(c)
            out_r.append(r)
            bar.update(len(c))
    bar.close()
    return (torch.cat(out_c), torch.cat(out_r)) if out_c else (torch.zeros(0), torch.zeros(0))


def code_version() -> str:
    """A hash of the training code (this module, the losses, packing, the lean forward): state written by other code
    is not reused."""
    from harness import losses, packing
    from harness.models import lean

    h = hashlib.sha256()
    for mod in (sys.modules[__name__], losses, packing, lean):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def resume_key(*parts) -> str:
    """What a resume state belongs to: a state written for other inputs (a crash, then a changed param) or by other
    training code is ignored."""
    h = hashlib.sha256(code_version().encode())
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


def train_dpo(policy, pairs: list[dict], cfg: config.Config, *, iteration: int, validation: list[tuple[str, str]] = (),
              resume_dir: Path | None = None) -> History:
    """One self-rewarding iteration: preference loss on {prompt, chosen, rejected, chosen_score, rejected_score}.

    The reference is the policy as loaded (M_t); its log-probs are computed once and cached on disk next to the
    resume state, so no second model is ever in memory and a resumed stage does not recompute them.
    """
    spin, max_len = cfg.model.spin, config.seq_len(cfg, cfg.model.data.train_ds)
    beta = config.schedule(spin.ref_policy_kl_penalty, iteration)
    avg, sft_avg = spin.preference_average_log_probs, config.sft_average_log_probs(spin)
    tok, pad = policy.tokenizer, policy.tokenizer.pad_token_id
    ch = [encode(tok, p["prompt"], p["chosen"], max_len) for p in pairs]
    rj = [encode(tok, p["prompt"], p["rejected"], max_len) for p in pairs]
    val = [encode(tok, p, r, config.seq_len(cfg, cfg.model.data.validation_ds)) for p, r in validation]
    key = resume_key(pairs, config.to_dict(cfg), iteration, policy.model)
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
    scores = torch.tensor([[p["chosen_score"], p["rejected_score"]] for p in pairs], dtype=torch.float32,
                          device=parallel.current().device)
    # CREAM: pairs carry a consistency rate (judge pairs and plain runs do not: 1, the unregularized loss)
    cream = any("consistency" in p for p in pairs)
    consistency = torch.tensor([p.get("consistency", 1.0) for p in pairs], dtype=torch.float32,
                               device=parallel.current().device)

    def step_fn(idx: list[int], batch_size: int):
        n = len(idx)
        c_logps, r_logps, sft_logps, c_len, r_len = pair_logps(
            policy.model, [ch[i] for i in idx], [rj[i] for i in idx], pad, avg,
            sft_avg if spin.sft_loss_weight else None)  # chosen and rejected in one forward
        c_ratio = c_logps - state["ref_chosen"][idx].to(c_logps.device)  # cached/resumed on CPU
        r_ratio = r_logps - state["ref_rejected"][idx].to(r_logps.device)
        kw = {"chosen_logratio": c_ratio, "rejected_logratio": r_ratio, "chosen_score": scores[idx, 0],
              "rejected_score": scores[idx, 1], "beta": beta, "gt_reward_scale": spin.gt_reward_scale}
        pref = (consistency_regularized_loss(spin.preference_loss, consistency[idx], **kw) if cream
                else preference_loss(spin.preference_loss, **kw))
        sft = -sft_logps if spin.sft_loss_weight else torch.zeros(n, device=pref.device)
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
                val_fn=val_sft(policy, val, cfg), phase="dpo", key=key,
                max_steps=cfg.trainer.self_rewarding.max_steps, keep_batches=True)
