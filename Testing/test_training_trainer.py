"""The generic trainer on a tiny 2-level U-Net and 32x32 images: learning, exact resume, no pickle."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from dafne_logic.core.errors import Cancelled, InputError
from dafne_logic.core.labels import Code, LabelTable, Muscle
from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.inference.networks import unet_architecture
from dafne_logic.training.trainer import TrainConfig, _TimeBudget, learning_rate, steps_within, train_model

TABLE = LabelTable("toy", (Muscle("disc", (255, 0, 0), Code("SCT", "1", "disc")),
                           Muscle("square", (0, 255, 0), Code("SCT", "2", "square"))))
TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 0}


def manifest() -> Manifest:
    return Manifest(name="toy", region="toy", version="1", architecture=unet_architecture(3, TINY), labels=TABLE,
                    provenance={"trained_on": "toy shapes"})


def toy_batch(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc (class 1) and a dark square (class 2) at random places on noise, 32x32."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images, targets = [], []
    for _ in range(batch):
        cy, cx, sy, sx = (torch.randint(6, 26, (4,), generator=generator)).tolist()
        target = torch.zeros(32, 32, dtype=torch.int64)
        target[((yy - cy) ** 2 + (xx - cx) ** 2) < 25] = 1
        target[(abs(yy - sy) < 4) & (abs(xx - sx) < 4)] = 2
        image = torch.where(target == 1, 1.0, torch.where(target == 2, -1.0, 0.0))
        images.append(image + 0.3 * torch.randn(32, 32, generator=generator))
        targets.append(target)
    return torch.stack(images)[:, None], torch.stack(targets)


def config(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=4, log_every=2, device="cpu",
                ema_decay=0.9, seed=3)
    return TrainConfig(**{**base, **kw})


def toy_dice(network: torch.nn.Module) -> dict[str, float]:
    images, targets = toy_batch(torch.Generator().manual_seed(99), 8)
    pred = network(images).argmax(1)
    scores = {}
    for c, m in enumerate(TABLE.muscles, start=1):
        inter = ((pred == c) & (targets == c)).sum().item()
        scores[m.name] = 2 * inter / max(1, (pred == c).sum().item() + (targets == c).sum().item())
    scores["mean_dice"] = sum(scores.values()) / len(scores)
    return scores


def test_loss_decreases_and_package_is_saved(tmp_path: Path):
    seen = []
    package = train_model(manifest(), toy_batch, config(steps=60, log_every=10), tmp_path / "model",
                          progress=lambda done, total, info: seen.append((done, total, info["loss"])),
                          validate=toy_dice)
    assert [s[0] for s in seen] == list(range(1, 61)) and all(s[1] == 60 for s in seen)
    first = sum(s[2] for s in seen[:5]) / 5
    last = sum(s[2] for s in seen[-5:]) / 5
    assert last < 0.6 * first
    loaded = ModelPackage.load(tmp_path / "model")
    assert loaded.manifest.weights_dtype == "float16"
    assert loaded.manifest.provenance["trained_on"] == "toy shapes"
    assert loaded.manifest.provenance["training"]["steps_done"] == 60
    assert toy_dice(loaded.network())["mean_dice"] > 0.5
    rows = list(csv.DictReader((tmp_path / "model.training" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert float(rows[-1]["mean_dice"]) == pytest.approx(package.manifest.provenance["training"]["final_validation"]["mean_dice"], abs=1e-4)


def test_resume_after_cancel_reproduces_uninterrupted_run(tmp_path: Path):
    straight = train_model(manifest(), toy_batch, config(), tmp_path / "a")
    calls = {"n": 0}

    def cancel_at_step_7() -> bool:
        calls["n"] += 1
        return calls["n"] == 8  # polled before step index 7

    with pytest.raises(Cancelled):
        train_model(manifest(), toy_batch, config(), tmp_path / "b", cancel=cancel_at_step_7)
    assert not (tmp_path / "b").exists()
    state = json.loads((tmp_path / "b.training" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from here
    resumed = train_model(manifest(), toy_batch, config(), tmp_path / "b", resume=True)
    for key, value in straight.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    rows = list(csv.DictReader((tmp_path / "b.training" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]


def test_resume_from_periodic_checkpoint_after_crash(tmp_path: Path):
    """A crash (not a polite cancel) loses only the steps after the last periodic checkpoint."""
    straight = train_model(manifest(), toy_batch, config(), tmp_path / "a")
    calls = {"n": 0}

    def crashing_batch(generator: torch.Generator, batch: int):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("power cut")
        return toy_batch(generator, batch)

    with pytest.raises(RuntimeError, match="power cut"):
        train_model(manifest(), crashing_batch, config(), tmp_path / "c")
    state = json.loads((tmp_path / "c.training" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8
    resumed = train_model(manifest(), toy_batch, config(), tmp_path / "c", resume=True)
    for key in straight.state_dict:
        assert torch.equal(straight.state_dict[key], resumed.state_dict[key]), key


def test_checkpoint_files_hold_no_pickle(tmp_path: Path):
    train_model(manifest(), toy_batch, config(steps=4), tmp_path / "m")
    files = sorted((tmp_path / "m.training" / "checkpoint").iterdir())
    names = {f.name for f in files}
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"} <= names
    for f in files + sorted((tmp_path / "m").iterdir()):
        data = f.read_bytes()
        assert not data.startswith(b"PK"), f  # torch.save zip archive
        if f.suffix == ".safetensors":  # 8-byte header length, JSON header, raw tensor bytes
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            assert len(data) == 8 + header_len + end, f
        else:
            assert f.suffix == ".json", f
            json.loads(data)


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path: Path):
    with pytest.raises(InputError, match="no checkpoint"):
        train_model(manifest(), toy_batch, config(), tmp_path / "x", resume=True)
    train_model(manifest(), toy_batch, config(steps=4), tmp_path / "y")
    with pytest.raises(InputError, match="other settings"):
        train_model(manifest(), toy_batch, config(steps=4, lr=0.5), tmp_path / "y", resume=True)


def test_resume_with_a_longer_schedule(tmp_path: Path):
    """An interrupted run may be continued over a new total number of steps."""
    train_model(manifest(), toy_batch, config(steps=8), tmp_path / "z")
    longer = train_model(manifest(), toy_batch, config(steps=12), tmp_path / "z", resume=True)
    assert longer.manifest.provenance["training"]["steps_done"] == 12
    rows = list(csv.DictReader((tmp_path / "z.training" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]


def test_init_state_and_learning_rate_schedule(tmp_path: Path):
    parent = train_model(manifest(), toy_batch, config(steps=30), tmp_path / "p")
    child = train_model(manifest(), toy_batch, config(steps=1, lr=1e-9, warmup_steps=0, ema_decay=None),
                        tmp_path / "c", init_state=parent.state_dict)
    for key, value in parent.state_dict.items():
        assert torch.allclose(value, child.state_dict[key], atol=1e-2), key
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)
    assert learning_rate(TrainConfig(steps=100, lr=1.0, warmup_steps=0, schedule="poly"), 100) == 0.0


def test_steps_within_a_time_limit():
    """The reserve (10 %) stays free; never beyond the ceiling, never below the steps done."""
    assert steps_within(100.0, 10.0, done=50, seconds_per_step=0.1, ceiling=10_000) == 50 + 800
    assert steps_within(100.0, 10.0, done=50, seconds_per_step=0.1, ceiling=300) == 300
    assert steps_within(100.0, 95.0, done=50, seconds_per_step=0.1, ceiling=10_000) == 50  # spent: stop now


def test_the_time_budget_fits_once_from_the_step_time_and_stops_at_the_limit():
    """Clock given by hand: no fit before 10 % of the limit has passed; the fit leaves validation
    time out of the step time; a slower device later ends the run at 95 % of the limit."""
    current = config(steps=10_000, warmup_steps=10, time_limit_s=100.0)
    budget = _TimeBudget.start(current, began=0.0)
    assert budget.fit(current, 5, 0.5) is current  # the measurement starts after the first 5 steps
    assert budget.fit(current, 10, 1.0) is current  # warm-up over, but only 1 % of the limit spent
    budget.paused_s += 4.0  # a validation
    current = budget.fit(current, 100, 14.0)
    assert current.steps == 100 + int((90.0 - 14.0) / ((14.0 - 0.5 - 4.0) / 95))  # 0.1 s a step: 860
    assert budget.fit(current, 200, 24.0) is current  # fitted once; on time (0.1 s a step): no refit
    assert budget.fit(current, 700, 96.0).steps == 700  # past 95 % of the limit: this step is the last


def test_steps_slowing_after_the_fit_shorten_the_schedule_once_so_it_still_ends_in_time():
    """Another run sharing the device starts after the fit: the steps since then average 0.26 s instead
    of 0.1 s, so the fitted 900 steps would end far past the limit; at half the limit, refit from that."""
    current = config(steps=10_000, warmup_steps=10, time_limit_s=100.0)
    budget = _TimeBudget.start(current, began=0.0)
    budget.fit(current, 5, 0.5)
    current = budget.fit(current, 100, 10.0)
    assert current.steps == 100 + int(80.0 / (9.5 / 95))  # 900 at 0.1 s a step
    assert budget.fit(current, 200, 39.0) is current  # slow already, but judged only at half the limit
    budget.paused_s += 3.0  # a validation: not step time
    current = budget.fit(current, 250, 52.0)  # (52 - 10 - 3) / 150 = 0.26 s a step since the fit
    assert current.steps == 250 + int((90.0 - 52.0) / 0.26)  # 396: ends at 90 % of the limit
    assert budget.fit(current, 300, 80.0) is current  # looked at once only; the 95 % cut still guards the end


def test_a_passing_slow_spell_after_the_fit_leaves_the_schedule_alone():
    """A CPU shared for a while (trial v11's steps 1,123-1,403 ran at twice its usual step time): the
    run still ends within its limit, so the schedule stays as fitted."""
    current = config(steps=10_000, warmup_steps=10, time_limit_s=100.0)
    budget = _TimeBudget.start(current, began=0.0)
    budget.fit(current, 5, 0.5)
    current = budget.fit(current, 100, 10.0)  # 900 steps at 0.1 s: ends at 90 s
    assert budget.fit(current, 125, 15.0) is current  # 25 steps at 0.2 s: a slow spell (ends at 92.5 s now)
    assert budget.fit(current, 475, 50.0) is current and budget.looked_again  # looked at half the limit: left alone


def test_a_time_limit_cannot_be_resumed(tmp_path: Path):
    with pytest.raises(InputError, match="cannot be combined with resuming"):
        train_model(manifest(), toy_batch, config(time_limit_s=60.0), tmp_path / "model", resume=True)


def test_a_time_limit_fits_the_schedule_and_ends_the_run_with_a_final_validation(tmp_path: Path):
    """Steps slow down after the schedule was fitted (as when another job takes the device): the
    run still ends within its limit, at a step that gets the final validation and log row, and the
    manifest records the steps done and the limit."""
    steps_seen: list[tuple[int, int]] = []

    def slowing_batch(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(steps_seen) > 20:
            time.sleep(0.2)
        return toy_batch(generator, batch)

    package = train_model(manifest(), slowing_batch, config(steps=100_000, warmup_steps=10, time_limit_s=1.5),
                          tmp_path / "model", progress=lambda done, total, info: steps_seen.append((done, total)),
                          validate=toy_dice)
    training = package.manifest.provenance["training"]
    done = training["steps_done"]
    assert 10 <= done < 100  # at 0.2 s a step after step 20, at most a few more fit in 1.5 s
    assert steps_seen[-1] == (done, done)
    fitted = [total for _, total in steps_seen if total != 100_000]
    assert fitted and done <= fitted[0] < 100_000  # fitted once 10 % of the limit had passed; the slow-down then cut it
    assert training["steps_asked"] == 100_000
    assert training["config"]["time_limit_s"] == 1.5 and training["config"]["steps"] == done
    assert training["final_validation"] is not None
    rows = list(csv.DictReader((tmp_path / "model.training" / "train_log.csv").open()))
    assert int(rows[-1]["step"]) == done and rows[-1]["mean_dice"] != ""


def test_a_time_limit_must_be_positive():
    with pytest.raises(InputError, match="time limit"):
        config(time_limit_s=0.0)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's list of mapped files")
def test_a_resumed_run_keeps_no_checkpoint_file_mapped(tmp_path: Path):
    """Windows cannot replace or delete a memory-mapped file: if the optimiser kept tensors mapped from
    the checkpoint it resumed, the run's next checkpoint would fail there. Linux shows the mappings."""
    calls = {"n": 0}

    def cancel_at_step_5() -> bool:
        calls["n"] += 1
        return calls["n"] == 6

    with pytest.raises(Cancelled):
        train_model(manifest(), toy_batch, config(), tmp_path / "run", cancel=cancel_at_step_5)
    mapped: list[str] = []

    def look(done: int, total: int, info: dict) -> None:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8")
        mapped.extend(line.split()[-1] for line in maps.splitlines() if "run.training" in line)

    train_model(manifest(), toy_batch, config(), tmp_path / "run", resume=True, progress=look)
    assert mapped == []


def test_a_log_file_held_open_costs_a_warning_not_the_run(tmp_path: Path, monkeypatch, caplog):
    """Watching train_log.csv in Excel on Windows makes its rewrite fail: the run goes on, every row is
    kept, and the next rewrite has them all."""
    import dafne_logic.training.trainer as trainer

    log = trainer._TrainLog(tmp_path, None)
    real_write = trainer.atomic_write_text

    def held_open(path, text, replace_retry_s=None):
        assert replace_retry_s == 0  # no two-second wait on Windows at every log step
        raise PermissionError(13, "in use by another program", str(path))

    monkeypatch.setattr(trainer, "atomic_write_text", held_open)
    log.add(2, 0.5, 1e-3, 1.0, {"mean_dice": 0.4})
    assert "could not update" in caplog.text and "train_log.csv" in caplog.text
    monkeypatch.setattr(trainer, "atomic_write_text", real_write)
    log.add(4, 0.4, 1e-3, 2.0, {"mean_dice": 0.5})
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open(encoding="utf-8")))
    assert [(r["step"], r["mean_dice"]) for r in rows] == [("2", "0.4000"), ("4", "0.5000")]
    assert [e["step"] for e in json.loads((tmp_path / "validation.json").read_text(encoding="utf-8"))] == [2, 4]
