"""Where every file of a run lives, and which data files each stage reads: one place for the stages, dvc.yaml and
the CLI, so a file a stage reads is always a DVC dependency of that stage.

    lay = Layout(log_dir(cfg))
    lay.model(t)              # iter<t>/model

Iterations are numbered as NeMo-Aligner numbers them: t = 0 is the first (the SFT iteration when
first_iteration_sft). iter<t> holds what iteration t produced, so iter<t>/model is M_{t+1} (M1 = iter0/model), and
iteration t generates, judges and is referenced by M_t = model_before(cfg, lay, t).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import config


@dataclass(frozen=True)
class Layout:
    root: Path = Path("runs")

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def base_model(self) -> Path:
        return self.root / "base" / "model"

    @property
    def baseline(self) -> Path:
        return self.root / "sft_baseline"  # the papers' "SFT baseline": IFT data only

    def it(self, t: int) -> Path:
        return self.root / f"iter{t}"

    def model(self, t: int) -> Path:
        return self.it(t) / "model"

    def resume(self, t: int | str) -> Path:
        """Resume state of iteration t's training (or of "sft_baseline"). Not a DVC output (DVC deletes outputs
        before a stage runs): it survives a crash so the stage can resume."""
        return self.root / "resume" / (t if isinstance(t, str) else f"iter{t}")


def log_dir(cfg: config.Config) -> Path:
    """exp_manager.explicit_log_dir, else <exp_manager.exp_dir>/<exp_manager.name> (NeMo's exp_manager), else runs."""
    em = cfg.exp_manager
    if em.explicit_log_dir:
        return Path(em.explicit_log_dir)
    return Path(em.exp_dir) / em.name if em.exp_dir else Path("runs")


def use_world(cfg: config.Config) -> bool:
    """The synthetic task world supplies prompts, gold answers and the oracle (no prompts file configured)."""
    return config.uses_task_world(cfg)


def use_sft_baseline(cfg: config.Config) -> bool:
    """The IFT-only SFT baseline: task world, SFT iteration, and model.sft.baseline."""
    return use_world(cfg) and cfg.model.spin.first_iteration_sft and cfg.model.sft.baseline


def initial_model(cfg: config.Config, lay: Layout) -> Path:
    return Path(cfg.pretrained_checkpoint.restore_from_path or lay.base_model)


def model_before(cfg: config.Config, lay: Layout, t: int) -> Path:
    """M_t, the model that iteration t starts from (generates, judges and is the reference)."""
    return initial_model(cfg, lay) if t == 0 else lay.model(t - 1)


def prompts_file(cfg: config.Config, lay: Layout, t: int) -> Path:
    """Iteration t's prompts: the world's prompts_<t>.jsonl, or model.data.train_ds.file_path (one per iteration
    when it is a list)."""
    fp = cfg.model.data.train_ds.file_path
    if fp is None:
        return lay.world / f"prompts_{t}.jsonl"
    return Path(fp[t] if isinstance(fp, list) else fp)


def validation_file(cfg: config.Config, lay: Layout) -> Path | None:
    fp = cfg.model.data.validation_ds.file_path
    if fp is not None:
        return Path(fp)
    return lay.world / "validation.jsonl" if use_world(cfg) else None


def sft_files(cfg: config.Config, lay: Layout) -> dict[str, Path]:
    """Iteration 0's training files: gold answers (ift), judge training (eft) and, in the task world, meta-judge
    training (mft). IFT defaults to the task world's seed, else to iteration 0's train_ds file (NeMo trains the
    first iteration on train_ds when first_iteration_sft)."""
    d = cfg.model.data
    out: dict[str, Path] = {}
    if d.sft_ds.file_path:
        out["ift"] = Path(d.sft_ds.file_path)
    elif use_world(cfg):
        out["ift"] = lay.world / "ift.jsonl"
    else:
        out["ift"] = prompts_file(cfg, lay, 0)
    if d.judge_train_ds.file_path:
        out["eft"] = Path(d.judge_train_ds.file_path)
    elif use_world(cfg):
        out["eft"] = lay.world / "eft.jsonl"
        if cfg.world.num_mft > 0:
            out["mft"] = lay.world / "mft.jsonl"
    return out


def data_files(cfg: config.Config, lay: Layout, stage: str, t: int | None = None) -> list[Path]:
    """The data files (not models, not other stages' outputs) `stage` reads: its DVC dependencies. The task world
    is one directory."""
    if stage == "prepare":
        return []
    world = [lay.world] if use_world(cfg) else []
    val = [validation_file(cfg, lay)] if cfg.model.data.validation_ds.file_path else []
    if stage in ("sft", "sft_baseline"):
        user = [] if use_world(cfg) and stage == "sft_baseline" else [
            p for p in sft_files(cfg, lay).values() if not p.is_relative_to(lay.world)]
        return _unique([*world, *user, *val])
    if stage == "generate":
        return world if use_world(cfg) else [prompts_file(cfg, lay, t)]
    if stage in ("train", "evaluate"):
        return _unique([*world, *val])
    return []


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))
