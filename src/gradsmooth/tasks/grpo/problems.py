"""Problems with verifiable integer answers: a procedural arithmetic generator and GSM8K.

An arithmetic problem chains a few operations on small integers::

    prompt:    "Start with 7. Add 5. Multiply by 2. Subtract 3. What is the result?\\n"
    solution:  "7+5=12. 12*2=24. 24-3=21. Answer: 21"

Every intermediate value stays in ``[0, max_value]``. The training problems are drawn from
``data.seed``, the held-out set from its own ``data.val_seed``, and held-out prompts never occur
among the training problems. The warm start trains on the worked solutions, a fraction of which
stop after the first step (``7+5=12. Answer: 12``); GRPO sees only the prompts and the answers.

Answers are parsed strictly for the correctness reward: an arithmetic completion must end with
``Answer: <int>`` and a GSM8K completion must contain ``#### <number>`` (with the usual
final-number fallback for GSM8K, see :func:`parse_gsm8k_answer`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional

ANSWER_FORMATS = ("arithmetic", "gsm8k")

# "Answer: 21" as the last line of the completion, nothing but whitespace after the integer.
_ARITHMETIC_ANSWER = re.compile(r"(?:^|[\s.])Answer: (-?\d+)\s*\Z")
_GSM8K_MARKED = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass
class Problem:
    prompt: str
    answer: int
    solution: str


@dataclass
class ArithmeticDataConfig:
    """The embedded problem generator.

    min_steps, max_steps: operations per problem, drawn uniformly; more steps are harder.
    max_operand: largest number added or subtracted, and largest starting value.
    multipliers: factors a multiplication step may use.
    max_value: every intermediate value stays in [0, max_value].
    train_size: training problems (prompts); GRPO draws its prompt groups from them.
    val_size: held-out problems for the greedy accuracy ``val/acc``.
    premature_answer_fraction: fraction of the warm-start solutions that stop after the first
        step and give its result as the answer ("7+5=12. Answer: 12"), which is wrong whenever
        the problem has two or more steps. A policy warm-started on them sometimes stops early,
        so GRPO has a behaviour to learn: finish the steps.
    seed, val_seed: generator seeds of the training and the held-out problems.
    eval_batch_size: prompts per greedy generation batch in evaluation.
    """

    name: str = "arithmetic"
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 9
    multipliers: list[int] = field(default_factory=lambda: [2, 3])
    max_value: int = 99
    premature_answer_fraction: float = 0.5
    train_size: int = 20000
    val_size: int = 200
    seed: int = 0
    val_seed: int = 1
    eval_batch_size: int = 100

    def __post_init__(self) -> None:
        for key in ("min_steps", "max_operand", "max_value", "train_size", "val_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1; got {getattr(self, key)}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"data.max_steps ({self.max_steps}) must be >= data.min_steps ({self.min_steps})")
        if any(m < 2 for m in self.multipliers):
            raise ValueError(f"data.multipliers must all be >= 2; got {list(self.multipliers)}")
        if self.max_value < self.max_operand:
            raise ValueError(f"data.max_value ({self.max_value}) must be >= data.max_operand ({self.max_operand})")
        if not 0.0 <= self.premature_answer_fraction <= 1.0:
            raise ValueError(f"data.premature_answer_fraction must be in [0, 1]; got {self.premature_answer_fraction}")
        if self.seed == self.val_seed:
            raise ValueError(f"data.seed and data.val_seed must differ so the held-out set has its own draw; both are {self.seed}")
        self.multipliers = [int(m) for m in self.multipliers]


def _arithmetic_problem(rng: random.Random, config: ArithmeticDataConfig) -> Problem:
    value = rng.randint(1, config.max_operand)
    sentences, steps = [f"Start with {value}."], []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        choices = [("add", n) for n in range(1, config.max_operand + 1) if value + n <= config.max_value]
        choices += [("subtract", n) for n in range(1, min(config.max_operand, value) + 1)]
        choices += [("multiply", m) for m in config.multipliers if value * m <= config.max_value]
        # Each operation kind is equally likely whatever the number of operands it allows.
        kinds = sorted({kind for kind, _ in choices})
        kind = rng.choice(kinds)
        operand = rng.choice([n for k, n in choices if k == kind])
        if kind == "add":
            result, sentence, symbol = value + operand, f"Add {operand}.", "+"
        elif kind == "subtract":
            result, sentence, symbol = value - operand, f"Subtract {operand}.", "-"
        else:
            result, sentence, symbol = value * operand, f"Multiply by {operand}.", "*"
        sentences.append(sentence)
        steps.append(f"{value}{symbol}{operand}={result}.")
        value = result
    prompt = " ".join(sentences) + " What is the result?\n"
    solution = " ".join(steps) + f" Answer: {value}"
    # Drawn for every problem, so the problems themselves do not depend on the fraction.
    if rng.random() < config.premature_answer_fraction:
        first_result = steps[0].rstrip(".").split("=")[1]
        solution = f"{steps[0]} Answer: {first_result}"
    return Problem(prompt=prompt, answer=value, solution=solution)


def generate_problems(config: ArithmeticDataConfig, count: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """Draw ``count`` problems from ``seed``, skipping prompts in ``exclude``; the same arguments give the same list."""
    rng = random.Random(seed)
    exclude = exclude or set()
    problems = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(
                f"the generator found only {len(problems)} of {count} problems outside the held-out set; "
                "raise data.max_steps or data.max_operand, or lower data.train_size"
            )
        problem = _arithmetic_problem(rng, config)
        if problem.prompt not in exclude:
            problems.append(problem)
    return problems


def arithmetic_splits(config: ArithmeticDataConfig) -> tuple[list[Problem], list[Problem]]:
    """Return the training problems and the held-out problems (distinct prompts, each from its own seed)."""
    held_out = _distinct(generate_problems(config, 4 * config.val_size, config.val_seed))[: config.val_size]
    if len(held_out) < config.val_size:
        raise ValueError(
            f"the generator produced only {len(held_out)} distinct held-out problems, fewer than data.val_size="
            f"{config.val_size}; raise data.max_steps or data.max_operand, or lower data.val_size"
        )
    train = generate_problems(config, config.train_size, config.seed, exclude={p.prompt for p in held_out})
    return train, held_out


def _distinct(problems: list[Problem]) -> list[Problem]:
    seen, unique = set(), []
    for problem in problems:
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            unique.append(problem)
    return unique


def parse_arithmetic_answer(completion: str) -> Optional[int]:
    """Return the integer of a completion that ends with ``Answer: <int>``, or None when it does not."""
    match = _ARITHMETIC_ANSWER.search(completion or "")
    return int(match.group(1)) if match else None


def _to_number(text: str) -> Optional[float]:
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def parse_gsm8k_answer(completion: str) -> Optional[float]:
    """Return the final number of a GSM8K-style completion, or None when it has none.

    The number after the last ``####`` wins; without that marker the last number in the text is
    taken, the usual lenient extraction for models that do not follow the format. Commas are
    thousands separators ("1,000" is 1000).
    """
    completion = completion or ""
    marked = _GSM8K_MARKED.findall(completion)
    candidates = marked or _NUMBER.findall(completion)
    for candidate in reversed(candidates):
        number = _to_number(candidate)
        if number is not None:
            return number
    return None


def has_answer_format(completion: str, answer_format: str) -> bool:
    """Return whether ``completion`` states its answer in the task's format (``Answer: N`` or ``#### N``)."""
    if answer_format == "arithmetic":
        return parse_arithmetic_answer(completion) is not None
    return bool(_GSM8K_MARKED.search(completion or ""))


def is_correct(completion: str, answer, answer_format: str) -> bool:
    """Return whether the parsed answer of ``completion`` equals ``answer`` exactly."""
    if answer_format == "arithmetic":
        parsed = parse_arithmetic_answer(completion)
        return parsed is not None and parsed == int(answer)
    parsed = parse_gsm8k_answer(completion)
    return parsed is not None and abs(parsed - float(answer)) < 1e-6


@dataclass
class GSM8KDataConfig:
    """GSM8K through ``datasets.load_dataset``: ``question`` and an ``answer`` that ends with ``#### <number>``.

    path, config_name, data_dir, data_files: ``load_dataset`` arguments; local files in the
        hub's format work with ``path=json`` or ``parquet`` and ``data_files``.
    train_split, val_split: the splits to train on and to measure held-out accuracy on.
    train_size: at most this many training problems; null keeps all.
    val_size: held-out problems evaluated (the first ones of ``val_split``); null keeps all.
    instruction: text appended to each question; it asks for the ``#### <number>`` format.
    eval_batch_size: prompts per greedy generation batch in evaluation.
    cache_dir: ``datasets`` cache; null uses its default.
    """

    name: str = "gsm8k"
    path: str = "openai/gsm8k"
    config_name: Optional[str] = "main"
    data_dir: Optional[str] = None
    # Any, not Optional[Dict]: OmegaConf 2.3 cannot merge a mapping override into a None typed Optional[Dict].
    data_files: Any = None
    train_split: str = "train"
    val_split: str = "test"
    train_size: Optional[int] = None
    val_size: Optional[int] = 500
    instruction: str = "Solve the problem step by step. Write the final answer as a number on the last line, after '#### '."
    eval_batch_size: int = 32
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("train_size", "val_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1 or null; got {value}")
        if self.eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1; got {self.eval_batch_size}")
        if self.data_files is not None:
            self.data_files = dict(self.data_files)


def gsm8k_reference_answer(answer_text: str) -> float:
    """Return the number after ``####`` in a GSM8K reference answer, raising when it has none."""
    marked = _GSM8K_MARKED.findall(answer_text or "")
    number = _to_number(marked[-1]) if marked else None
    if number is None:
        raise ValueError(f"a GSM8K answer must end with '#### <number>'; got {answer_text[-80:]!r}")
    return number


def gsm8k_splits(config: GSM8KDataConfig) -> tuple[list[Problem], list[Problem]]:
    """Load the training and held-out GSM8K problems; the solution is the reference answer text."""
    from datasets import load_dataset

    def load(split: str, limit: Optional[int]) -> list[Problem]:
        dataset = load_dataset(
            config.path,
            config.config_name,
            data_dir=config.data_dir,
            data_files=config.data_files,
            split=split,
            cache_dir=config.cache_dir,
        )
        missing = {"question", "answer"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"data.path {config.path!r} split {split!r} lacks column(s) {sorted(missing)}; "
                f"GSM8K rows have 'question' and 'answer', found {dataset.column_names}"
            )
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        return [
            Problem(prompt=f"{row['question'].strip()}\n{config.instruction}\n", answer=gsm8k_reference_answer(row["answer"]), solution=row["answer"])
            for row in dataset
        ]

    return load(config.train_split, config.train_size), load(config.val_split, config.val_size)


DATA_CONFIGS = {"arithmetic": ArithmeticDataConfig, "gsm8k": GSM8KDataConfig}


def answer_format_of(data) -> str:
    return "arithmetic" if isinstance(data, ArithmeticDataConfig) else "gsm8k"


def load_problems(data) -> tuple[list[Problem], list[Problem]]:
    """Return the training and held-out problems of ``data`` (arithmetic or GSM8K settings)."""
    if isinstance(data, ArithmeticDataConfig):
        return arithmetic_splits(data)
    return gsm8k_splits(data)
