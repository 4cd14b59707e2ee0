"""The GRPO runner: answer parsing, the problem generator, the warm-start cache, the optimizer
TRL steps, short runs, and bad input rejected before any model is built.

Every policy here is a tiny Llama built or warm-started by the test; GSM8K is a few problems the
test writes in the hub's jsonl format.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402
from gradsmooth.models.causal_lm import CausalLMConfig, build_causal_lm
from gradsmooth.smoothing import SmoothingConfig, smooth
from gradsmooth.tasks.grpo import warm_start as warm_start_module
from gradsmooth.tasks.grpo.config import GRPOTaskConfig, PolicyConfig, check_generation_batch, check_policy_path
from gradsmooth.tasks.grpo.problems import (
    ArithmeticDataConfig,
    GSM8KDataConfig,
    arithmetic_splits,
    generate_problems,
    gsm8k_reference_answer,
    gsm8k_splits,
    has_answer_format,
    is_correct,
    parse_arithmetic_answer,
    parse_gsm8k_answer,
)
from gradsmooth.tasks.grpo.runner import correct_reward, format_reward
from gradsmooth.tasks.grpo.warm_start import byte_tokenizer, warm_start_policy
from gradsmooth.training import TrainerConfig
from gradsmooth.training.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_MODEL = CausalLMConfig(n_layer=3, d_model=32, n_head=2)
SMALL_DATA = ArithmeticDataConfig(train_size=200, val_size=16, eval_batch_size=16)
# A tiny run through train.py: 2 GRPO steps on one-step problems, from a policy warm-started
# for 60 steps, long enough that it states answers in the format and the format reward varies.
TINY_RUN = [
    "task=grpo",
    "model.n_layer=3",
    "model.d_model=32",
    "model.n_head=2",
    "data.min_steps=1",
    "data.max_steps=1",
    "data.premature_answer_fraction=0",
    "data.train_size=500",
    "data.val_size=16",
    "data.eval_batch_size=16",
    "policy.warm_start_steps=60",
    "policy.warm_start_batch_size=32",
    "policy.warm_start_lr=1e-2",
    "task.batch_size=8",
    "task.num_generations=4",
    "task.max_completion_length=24",
    "task.format_reward=0.5",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "trainer.max_steps=2",
    "trainer.eval_every=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
]


# Answer parsing and rewards.


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("7+5=12. 12*2=24. Answer: 24", 24),
        ("Answer: 3", 3),
        ("Answer: -4\n", -4),
        ("7+5=12. Answer: 13", 13),
        ("7+5=12. Answer: 12 and more", None),
        ("7+5=12. Answer: twelve", None),
        ("7+5=12. Answer:12", None),
        ("7+5=12. answer: 12", None),
        ("7+5=12.", None),
        ("Answer: 1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_arithmetic_answer_parsing(completion, expected):
    assert parse_arithmetic_answer(completion) == expected


def test_arithmetic_rewards_correct_wrong_malformed_empty():
    completions = ["1+2=3. Answer: 3", "1+2=3. Answer: 4", "1+2=3. Answer: 3x", ""]
    answers = [3, 3, 3, 3]
    assert correct_reward(None, completions, answers, answer_format="arithmetic") == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(None, completions, answer_format="arithmetic") == [1.0, 1.0, 0.0, 0.0]


def test_rewards_read_chat_completions():
    completions = [[{"role": "assistant", "content": "So #### 72"}], [{"role": "assistant", "content": "#### 71"}]]
    assert correct_reward(None, completions, [72.0, 72.0], answer_format="gsm8k") == [1.0, 0.0]


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", 7.0),
        ("#### 1,000", 1000.0),
        ("Total: 12 dollars, then #### 15", 15.0),
        ("#### 2\nwait, #### 3", 3.0),
        ("no marker, the answer is 42.", 42.0),
        ("#### -5", -5.0),
        ("#### 2.50", 2.5),
        ("no number at all", None),
        ("", None),
    ],
)
def test_gsm8k_answer_extraction(completion, expected):
    assert parse_gsm8k_answer(completion) == expected


def test_gsm8k_format_needs_marker():
    assert has_answer_format("so #### 7", "gsm8k")
    assert not has_answer_format("so 7", "gsm8k")
    assert is_correct("so 7", 7.0, "gsm8k")
    assert not is_correct("", 7.0, "gsm8k")


def test_gsm8k_reference_without_marker_raises():
    assert gsm8k_reference_answer("4 + 4 = 8\n#### 8") == 8.0
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference_answer("4 + 4 = 8")


# The problem generator.


def test_generator_is_deterministic():
    config = ArithmeticDataConfig()
    first = generate_problems(config, 50, seed=3)
    second = generate_problems(config, 50, seed=3)
    assert [(p.prompt, p.answer, p.solution) for p in first] == [(p.prompt, p.answer, p.solution) for p in second]
    assert [p.prompt for p in generate_problems(config, 50, seed=4)] != [p.prompt for p in first]


def test_held_out_set_is_fixed_and_disjoint():
    train_a, val_a = arithmetic_splits(SMALL_DATA)
    train_b, val_b = arithmetic_splits(ArithmeticDataConfig(train_size=100, val_size=16, seed=5))
    # The held-out set depends on val_seed only, not on the training seed or size.
    assert [p.prompt for p in val_a] == [p.prompt for p in val_b]
    assert len({p.prompt for p in val_a}) == 16
    assert not {p.prompt for p in val_a} & {p.prompt for p in train_a}
    assert not {p.prompt for p in val_b} & {p.prompt for p in train_b}


def test_solutions_are_correct_and_in_range():
    config = ArithmeticDataConfig(min_steps=3, max_steps=5, premature_answer_fraction=0.0)
    for problem in generate_problems(config, 300, seed=0):
        assert parse_arithmetic_answer(problem.solution) == problem.answer
        steps = problem.solution.split(". ")[:-1]
        assert 3 <= len(steps) <= 5
        for step in steps:
            expression, result = step.rstrip(".").split("=")
            assert 0 <= int(result) <= config.max_value
            assert eval(expression) == int(result)  # noqa: S307 - digits and one operator, written by the generator


def test_premature_answers_keep_the_problems():
    worked = generate_problems(ArithmeticDataConfig(premature_answer_fraction=0.0), 200, seed=0)
    mixed = generate_problems(ArithmeticDataConfig(premature_answer_fraction=0.5), 200, seed=0)
    assert [(p.prompt, p.answer) for p in worked] == [(p.prompt, p.answer) for p in mixed]
    premature = [m for w, m in zip(worked, mixed) if m.solution != w.solution]
    assert 70 <= len(premature) <= 130
    for problem in premature:
        first_step = problem.solution.split(" Answer")[0]
        assert first_step.count("=") == 1
        assert parse_arithmetic_answer(problem.solution) == int(first_step.rstrip(".").split("=")[1])


def test_difficulty_changes_steps():
    easy = generate_problems(ArithmeticDataConfig(min_steps=1, max_steps=1, premature_answer_fraction=0.0), 20, seed=0)
    hard = generate_problems(ArithmeticDataConfig(min_steps=6, max_steps=6, premature_answer_fraction=0.0), 20, seed=0)
    assert all(p.solution.count("=") == 1 for p in easy)
    assert all(p.solution.count("=") == 6 for p in hard)


# The warm start and its cache.


def test_warm_start_cache_reused(tmp_path, monkeypatch, caplog):
    policy = PolicyConfig(warm_start_steps=3, warm_start_batch_size=8, cache_dir=str(tmp_path))
    loop = TrainerConfig(progress_bar=False)
    first = warm_start_policy(TINY_MODEL, SMALL_DATA, policy, loop)
    assert (first / "config.json").is_file()
    assert (first / "tokenizer.json").is_file()
    assert (first / "metrics.jsonl").is_file()
    assert [path.name for path in first.parent.iterdir()] == [first.name]

    def fail(*args, **kwargs):
        raise AssertionError("a cached warm start must not train again")

    monkeypatch.setattr("gradsmooth.training.train", fail)
    with caplog.at_level(logging.INFO, logger="gradsmooth"):
        second = warm_start_policy(TINY_MODEL, SMALL_DATA, policy, loop)
    assert second == first
    assert "reusing the cached policy" in caplog.text

    changed = PolicyConfig(warm_start_steps=4, warm_start_batch_size=8, cache_dir=str(tmp_path))
    assert warm_start_module.warm_start_key(TINY_MODEL, SMALL_DATA, changed) != first.name


def test_warm_start_keeps_first_copy_on_race(tmp_path, monkeypatch):
    """A job that finishes second discards its copy and uses the one already in place."""
    policy = PolicyConfig(warm_start_steps=2, warm_start_batch_size=8, cache_dir=str(tmp_path))
    target = tmp_path / "grpo-warm-start" / warm_start_module.warm_start_key(TINY_MODEL, SMALL_DATA, policy)
    real_rename = warm_start_module.os.rename

    def rename_after_other_job(source, destination):
        Path(destination).mkdir(parents=True)
        (Path(destination) / "config.json").write_text("{}")
        real_rename(source, destination)

    monkeypatch.setattr(warm_start_module.os, "rename", rename_after_other_job)
    result = warm_start_policy(TINY_MODEL, SMALL_DATA, policy, TrainerConfig(progress_bar=False))
    assert result == target
    assert (target / "config.json").read_text() == "{}"
    assert [path.name for path in target.parent.iterdir()] == [target.name]


# The optimizer TRL steps.


def _tiny_policy(path: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = build_causal_lm(TINY_MODEL, len(tokenizer), tokenizer.eos_token_id)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _length_reward(prompts, completions, **kwargs):
    """A reward with variance inside every group, so every step has a nonzero policy gradient."""
    return [float(len(c)) / 10 for c in completions]


def _one_grpo_step(policy_dir: Path, smoothing: SmoothingConfig, output: Path):
    """Run one GRPO step with TRL on the policy in ``policy_dir``; return the optimizer, start and end weights."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from gradsmooth.optim import OptimConfig, build_optimizer, build_scheduler
    from gradsmooth.tasks.grpo.runner import load_policy

    model, tokenizer = load_policy(policy_dir, "float32")
    optim = OptimConfig(name="adamw", lr=1e-2, schedule="constant")
    optimizer = smooth(build_optimizer(optim, model), model, smoothing)
    scheduler = build_scheduler(optim, optimizer, 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = GRPOConfig(
        output_dir=str(output),
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["Start with 1. Add 2. What is the result?\n"] * 8})
    trainer = GRPOTrainer(
        model=model, reward_funcs=_length_reward, args=args, train_dataset=dataset,
        processing_class=tokenizer, optimizers=(optimizer, scheduler),
    )
    trainer.train()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return trainer, optimizer, before, after


def test_trl_steps_the_smoothed_optimizer(tmp_path):
    policy_dir = _tiny_policy(tmp_path / "policy")
    trainer, optimizer, before, after = _one_grpo_step(policy_dir, SmoothingConfig(window=3, alpha=0.2), tmp_path / "w3")
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer
    assert optimizer.smoothing_steps == 1
    for name in before:
        assert not torch.equal(before[name], after[name]), name


def test_smoothing_changes_the_applied_update(tmp_path):
    """The same step with window 3 applies the depth-mixed window-1 update to every block."""
    policy_dir = _tiny_policy(tmp_path / "policy")
    _, _, before, plain = _one_grpo_step(policy_dir, SmoothingConfig(window=1), tmp_path / "w1")
    _, _, _, mixed = _one_grpo_step(policy_dir, SmoothingConfig(window=3, alpha=0.2), tmp_path / "w3")

    slot = "self_attn.q_proj.weight"
    deltas = torch.stack([plain[f"model.layers.{i}.{slot}"] - before[f"model.layers.{i}.{slot}"] for i in range(3)])
    smoothed = torch.stack([mixed[f"model.layers.{i}.{slot}"] - before[f"model.layers.{i}.{slot}"] for i in range(3)])
    matrix = SmoothingConfig(window=3, alpha=0.2).mixing_matrix(3).float()
    assert not torch.allclose(smoothed, deltas)
    torch.testing.assert_close(smoothed, torch.einsum("ij,j...->i...", matrix, deltas), rtol=1e-4, atol=1e-7)
    # Parameters outside the stack get the plain update.
    torch.testing.assert_close(mixed["lm_head.weight"], plain["lm_head.weight"])


# Runs through train.py.


def test_two_step_run(tmp_path):
    run_dir = tmp_path / "run"
    final = train_script.run(compose(*TINY_RUN, f"policy.cache_dir={tmp_path / 'cache'}"), run_dir)
    assert 0.0 <= final <= 1.0

    results = json.loads((run_dir / "results.json").read_text())
    assert results["metric"] == "val/acc"
    assert results["metric_mode"] == "max"
    assert results["step"] == 2
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "stacks.txt", "curves.png"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in row for row in rows)
    keys = set().union(*rows)
    for key in ("val/acc", "train/reward", "train/reward_std", "completions/mean_length", "train/frac_reward_zero_std", "optim/lr"):
        assert key in keys, key
    assert [row["step"] for row in rows if "val/acc" in row] == [0, 1, 2]

    # Every trained tensor moved away from the warm start.
    from safetensors.torch import load_file

    start = load_file(Path(results["policy"]) / "model.safetensors")
    end = load_file(run_dir / "policy" / "model.safetensors")
    assert start.keys() == end.keys()
    unchanged = [name for name in start if torch.equal(start[name], end[name])]
    assert unchanged == []


def _write_gsm8k(root: Path) -> dict:
    """Write train and test jsonl files in GSM8K's format; return the data_files mapping."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?", "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
        for a, b in [(3, 4), (10, 5), (2, 9), (7, 7), (1, 1), (12, 30), (6, 2), (1000, 234)]
    ]
    for split, part in (("train", rows[:6]), ("test", rows[6:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    return {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}


def test_gsm8k_local_files(tmp_path):
    files = _write_gsm8k(tmp_path / "gsm8k")
    train_problems, val_problems = gsm8k_splits(GSM8KDataConfig(path="json", config_name=None, data_files=files, val_size=None))
    assert len(train_problems) == 6
    assert [p.answer for p in val_problems] == [8.0, 1234.0]
    assert val_problems[1].prompt.startswith("Tom has 1000 apples")
    assert "####" in val_problems[1].prompt


def test_gsm8k_run_on_local_policy(tmp_path):
    files = _write_gsm8k(tmp_path / "gsm8k")
    policy_dir = _tiny_policy(tmp_path / "policy")
    overrides = [
        "task=grpo",
        "data=gsm8k",
        "data.path=json",
        "data.config_name=null",
        f"data.data_files={{train: {files['train']}, test: {files['test']}}}",
        f"policy.path={policy_dir}",
        "task.batch_size=8",
        "task.num_generations=4",
        "task.max_completion_length=8",
        "trainer.max_steps=2",
        "trainer.progress_bar=false",
        "trainer.save_model=false",
    ]
    final = train_script.run(compose(*overrides), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["policy"] == str(policy_dir)
    assert final == results["val/acc"]


# Bad input, rejected before any model is built.


@pytest.fixture
def no_model_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was built before the invalid setting was reported")

    monkeypatch.setattr("gradsmooth.tasks.grpo.runner.load_policy", fail)
    monkeypatch.setattr("gradsmooth.tasks.grpo.warm_start.warm_start_policy", fail)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["task.num_generations=1"], ["task.num_generations", ">= 2"]),
        (["task.batch_size=12", "task.num_generations=8"], ["does not divide", "task.batch_size=8 or task.batch_size=16", "task.num_generations=6 or task.num_generations=12"]),
        (["task.batch_size=6", "task.num_generations=4", "trainer.grad_accum_steps=3"], ["= 18 completions", "task.batch_size=4 or task.batch_size=8", "task.num_generations=3 or task.num_generations=6"]),
        (["policy.path=/no/such/model"], ["policy.path", "not an existing model directory"]),
        (["policy.path='not a hub id!'"], ["policy.path", "neither a local model directory nor a Hugging Face Hub id"]),
        (["policy.path=someone/not-cached-model"], ["policy.path", "offline", "not in the local hub cache"]),
        (["task.loss_type=ppo"], ["task.loss_type", "dapo"]),
        (["task.scale_rewards=yes"], ["task.scale_rewards", "group, batch, none"]),
        (["data=gsm8k"], ["data=gsm8k", "policy.path"]),
        (["trainer.resume=auto"], ["trainer.resume", "not supported for task=grpo"]),
    ],
)
def test_bad_input_rejected_before_build(overrides, expected, tmp_path, monkeypatch, no_model_built):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        train_script.run(compose("task=grpo", *overrides, f"policy.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "cache").exists()
    assert (tmp_path / "run" / "failure.json").is_file()
    assert not (tmp_path / "run" / "results.json").exists()


def test_policy_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        check_policy_path(str(tmp_path / "empty"))
    assert check_policy_path(str(_tiny_policy(tmp_path / "policy"))) == "local"


def test_generation_batch_accepts_divisible():
    assert check_generation_batch(GRPOTaskConfig(batch_size=32, num_generations=8), 1, 1) == 32
    assert check_generation_batch(GRPOTaskConfig(batch_size=4, num_generations=8), 2, 1) == 8
