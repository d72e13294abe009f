"""The tasks (prompts with reference answers), their reward functions and the held-out evaluation.

Rewards parse model output safely: garbage or hostile output gets the lowest reward (0; -1 for arithmetic) and
never raises.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import torch

import common
from common import UserError, check


# Rewards -----------------------------------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)  # holds no <answer>: linear scan
MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**9
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def extract_answer_tag(text: str) -> Optional[str]:
    """Content of the last <answer>...</answer>, or None."""
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)  # commas only between thousands


def parse_number(text: str) -> Optional[Fraction]:
    """An exact number from text like '1,234', '-5', '3.50', '$12', '-$5' (ASCII digits); None if it is not one
    number ('1,8' is not)."""
    text = re.sub(r"^(-?)\$", r"\1", text.strip()).rstrip(".").strip()
    return Fraction(text.replace(",", "")) if len(text) <= 40 and NUMBER.fullmatch(text) else None


def numeric_answer(text: str) -> Optional[Fraction]:
    """The number in the answer tag, or else the tag's last word that is a number ("The answer is 18." and "(18)."
    give 18, "50%" 50; "1/2", ".5" or "1e3" give nothing rather than a wrong part of them). Numbers outside the tag
    never count."""
    inside = extract_answer_tag(text)
    words = [] if inside is None else [inside] + [w.rstrip(".").strip(",;:!?()%") for w in reversed(inside.split())]
    return next((value for value in map(parse_number, words) if value is not None), None)


def safe_eval_arithmetic(expression: str) -> Optional[tuple[Fraction, list[int]]]:
    """+ - * / over integer literals, exactly and without `eval`: (value, the literals used), or None for anything
    else (names, calls, powers, values beyond 1e9 at any point, division by zero, over-long input)."""
    if len(expression) > MAX_EXPRESSION_CHARS or not re.fullmatch(r"[0-9\s+\-*/().]*", expression):
        return None  # also no 0x10, 0b10, 1_0: every number written in decimal digits
    literals: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            value = Fraction(node.value)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in (ast.USub, ast.UAdd):
            value = -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            value = OPERATORS[type(node.op)](walk(node.left), walk(node.right))  # x / 0 raises ZeroDivisionError
        else:
            raise ValueError(f"not allowed: {type(node).__name__}")
        if abs(value) > MAX_ABS_VALUE:  # literals and every intermediate value
            raise ValueError("too large")
        return value

    try:
        return walk(ast.parse(expression.strip(), mode="eval")), literals
    except (SyntaxError, ValueError, ZeroDivisionError, MemoryError, RecursionError):
        return None


def arithmetic_reward(completion: str, answer: int) -> float:
    """1 if the completion's last word (after its last space or `=`) is exactly the integer answer, else -1 (DAPO's
    rule-based reward, section 2.4; how its sign meets GFPO's reward / length: docs/gfpo.md)."""
    text = re.split(r"[=\s]", completion.strip())[-1]
    return 1.0 if len(text) <= 20 and re.fullmatch(r"-?[0-9]+", text) is not None and int(text) == answer else -1.0


def countdown_reward(completion: str, answer: dict) -> float:
    """1 if the equation in the answer tag uses each given number exactly once and equals the target."""
    inside = extract_answer_tag(completion)
    numbers, target = sorted(answer["numbers"]), answer["target"]
    if inside is None or inside.count("=") > 1:
        return 0.0
    expression, _, stated = inside.partition("=")  # "a + b = target" is fine; a stated result must be the target
    if stated and parse_number(stated) != target:
        return 0.0
    result = safe_eval_arithmetic(expression)
    return float(result is not None and result[0] == target and sorted(result[1]) == numbers)


def numeric_reward(completion: str, answer: str) -> float:
    """1 if the number in the answer tag equals the reference number (commas, '$' ignored), else 0."""
    expected = parse_number(str(answer))
    return float(expected is not None and numeric_answer(completion) == expected)


def exact_reward(completion: str, answer: str) -> float:
    """For jsonl rows: numeric comparison when the reference is a number, else exact text in the tag."""
    if parse_number(str(answer)) is not None:
        return numeric_reward(completion, answer)
    inside = extract_answer_tag(completion)
    return float(inside is not None and inside.strip() == str(answer).strip())


# Tasks -------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    train: list[dict]  # rows with "prompt" and "answer"
    eval: list[dict]  # fixed held-out rows, never trained on
    reward_fn: Callable[[str, object], float]
    use_chat_template: bool


class PromptStream:
    """Endless shuffled passes over the training rows; `position` says how far it has read."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.rng, self.order, self.position = rows, random.Random(seed), [], 0

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position,
                "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])
        self.order, self.position = list(state["order"]), state["position"]

    def next(self, n: int) -> list[dict]:
        batch = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            batch.append(self.rows[self.order.pop()])
        self.position += n
        return batch


ARITHMETIC_EVAL_SIZE, ARITHMETIC_TRAIN_SIZE = 500, 40_000


def arithmetic_task() -> Task:
    """A number from 1 to 5 added to or taken from a four-digit one, `1234+5=` or `1234-5=`, answered directly or
    after working (`arithmetic_working`). Distinct problems drawn with seed 0: the first 500 are held out, the next
    40,000 are the training rows, so a run of up to 40,000 prompts never sees one twice."""
    rng, seen, rows = random.Random(0), set(), []
    while len(rows) < ARITHMETIC_EVAL_SIZE + ARITHMETIC_TRAIN_SIZE:
        a, op, b = rng.randint(1010, 9989), rng.choice("+-"), rng.randint(1, 5)
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            rows.append({"prompt": f"{a}{op}{b}=", "answer": a + b if op == "+" else a - b})
    return Task("arithmetic", rows[ARITHMETIC_EVAL_SIZE:], rows[:ARITHMETIC_EVAL_SIZE], arithmetic_reward, False)


def arithmetic_working(a: int, op: str, b: int, style: str, ramble: bool = False) -> str:
    """A completion for `a op b=` in one of the warm start's styles (assets/make_tiny_model.py), for 1234+5:
    `direct` 1239
    `steps`  count 1235+4=1236+3=1237+2=1238+1=1239   (one unit moved from b to a per step)
    With `ramble`, `+0` (or `-0`) over and over after the answer: longer than any completion budget."""
    sign = 1 if op == "+" else -1
    parts = [f"{a + sign * i}{op}{b - i}" for i in range(1, b if style == "steps" else 1)]
    working = ("count " if style == "steps" else "") + "=".join(parts + [str(a + sign * b)])
    return working + (f"{op}0" * 40 if ramble else "")


COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number must be used exactly once. Think step by step, then give the "
    "equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


def make_countdown(rng: random.Random) -> dict:
    """A TinyZero-style puzzle: 3 or 4 numbers in 1..99 combined by a random expression with an
    integer target in 1..999 (so a solution is known to exist)."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice([3, 4]))]
        order = numbers[:]
        rng.shuffle(order)
        value = Fraction(order[0])
        for n in order[1:]:
            value = rng.choice([value + n, value - n, value * n, value / n])
        if value.denominator == 1 and 1 <= value <= 999:
            target = int(value)
            prompt = COUNTDOWN_PROMPT.format(numbers=numbers, target=target)
            return {"prompt": prompt, "answer": {"numbers": numbers, "target": target}}


def countdown_task(num_train: int = 20000, num_eval: int = 200) -> Task:
    rng = random.Random(0)
    eval_rows = [make_countdown(rng) for _ in range(num_eval)]
    seen, train = {countdown_puzzle(row) for row in eval_rows}, []
    for row in (make_countdown(rng) for _ in range(num_train)):  # each puzzle once, none held out, in any order
        if countdown_puzzle(row) not in seen:
            seen.add(countdown_puzzle(row))
            train.append(row)
    return Task("countdown", train, eval_rows, countdown_reward, True)


def countdown_puzzle(row: dict) -> tuple:
    """What makes two countdown rows the same puzzle: the numbers in any order, and the target."""
    return tuple(sorted(row["answer"]["numbers"])), row["answer"]["target"]


GSM8K_PROMPT = "{question}\nSolve it step by step, then give the final number in <answer> </answer> tags."


def gsm8k_task(path: Optional[str] = None, num_eval: int = 500) -> Task:
    """GSM8K (openai/gsm8k, main, through `datasets`): the train split for training, the first `num_eval` test rows
    held out. Or, from `path`, a jsonl file of rows in GSM8K's format ({"question", "answer"}), 10% held out."""
    def row(r):
        return {"prompt": GSM8K_PROMPT.format(question=r["question"]), "answer": gsm8k_reference(r["answer"])}

    if path is not None:
        rows = read_jsonl(path, "gsm8k", ("question", "answer"), valid=lambda r: isinstance(r["answer"], str) and
                          parse_number(gsm8k_reference(r["answer"])) is not None, wanted="a number after '####'")
        train, held_out = split_rows([row(r) for r in rows], f"gsm8k:{path}")
        return Task(f"gsm8k:{path}", train, held_out, numeric_reward, True)
    try:
        from datasets import load_dataset

        data = load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no network, no cache: say so in one line
        raise UserError(f"--task gsm8k: could not load openai/gsm8k with `datasets` ({common._first_line(e)})")
    held_out = [row(r) for r in data["test"]][:num_eval]
    return Task("gsm8k", [row(r) for r in data["train"]], held_out, numeric_reward, True)


def gsm8k_reference(solution: str) -> str:
    """The reference answer is the text after '####', with thousands separators removed."""
    return solution.split("####")[-1].strip().replace(",", "")


def read_jsonl(path: str, task: str, keys: tuple[str, ...], valid=lambda row: True, wanted: str = "") -> list[dict]:
    """The rows of a jsonl file, each a dict holding `keys` (blank lines skipped) for which `valid` holds (else the
    error says the line's 'answer' needs `wanted`); bad input is a UserError."""
    check(Path(path).is_file(), f"--task {task}:{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:  # no permission to read it, say
        raise UserError(f"--task {task}:{path}: cannot read it ({common._first_line(e)})")
    rows = []
    with f:
        for number, raw in enumerate(f, 1):
            try:  # utf-8-sig: a byte-order mark at the start of the file is not part of the JSON
                row = json.loads(raw.decode("utf-8-sig")) if raw.strip() else None
            except (ValueError, RecursionError):  # bad UTF-8, bad JSON, too deep, or an integer too long to convert
                raise UserError(f"--task {task}:{path}: line {number} is not valid JSON in UTF-8")
            if row is not None:
                check(isinstance(row, dict) and all(k in row for k in keys),
                      f"--task {task}:{path}: line {number} needs both {' and '.join(repr(k) for k in keys)}")
                check(isinstance(row[keys[0]], str) and row[keys[0]].strip() != "",
                      f"--task {task}:{path}: line {number}'s {keys[0]!r} needs to be non-empty text")
                check(valid(row), f"--task {task}:{path}: line {number}'s 'answer' needs {wanted}")
                rows.append(row)
    check(len(rows) >= 2, f"--task {task}:{path}: needs at least 2 rows (one is held out), found {len(rows)}")
    return rows


def split_rows(rows: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """(train, held out): a fixed 10% of the rows (at least one) is held out, and no training row repeats the prompt
    of a held-out one."""
    rows = rows[:]
    random.Random(0).shuffle(rows)
    num_eval = max(1, len(rows) // 10)
    held_out = {row["prompt"] for row in rows[:num_eval]}
    train = [row for row in rows[num_eval:] if row["prompt"] not in held_out]
    check(len(train) > 0, f"--task {name}: every row has the prompt of a held-out row; nothing is left to train on")
    return train, rows[:num_eval]


def jsonl_task(path: str) -> Task:
    """Your own rows {"prompt": ..., "answer": ...}; a fixed 10% (at least one row) is held out."""
    rows = read_jsonl(path, "jsonl", ("prompt", "answer"), wanted="to be non-empty text or a number",
                      valid=lambda r: type(r["answer"]) in (str, int, float) and str(r["answer"]).strip() != "")
    rows = [{"prompt": str(r["prompt"]), "answer": str(r["answer"])} for r in rows]
    train, held_out = split_rows(rows, f"jsonl:{path}")
    return Task(f"jsonl:{path}", train, held_out, exact_reward, True)


TASKS = "arithmetic, countdown, gsm8k, gsm8k:PATH, jsonl:PATH"


def load_task(name: str) -> Task:
    if name in ("arithmetic", "countdown"):
        return arithmetic_task() if name == "arithmetic" else countdown_task()
    if name == "gsm8k" or name.startswith("gsm8k:"):  # `gsm8k:` with an empty path is a missing file, not the hub
        return gsm8k_task(name[len("gsm8k:") :] if name != "gsm8k" else None)
    if name.startswith("jsonl:"):
        return jsonl_task(name[len("jsonl:") :])
    raise UserError(f"--task {name}: unknown task; choose one of {TASKS}")


def score(task: Task, completions: list[str], rows: list[dict], group_size: int) -> torch.Tensor:
    """Reward of each completion; row i*G + j answers prompt i."""
    rewards = [task.reward_fn(text, rows[i // group_size]["answer"]) for i, text in enumerate(completions)]
    return torch.tensor(rewards, dtype=torch.float32)


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, max_new_tokens: int, eos_ids: list[int], batch_size: Optional[int] = None):
    """Greedy accuracy and mean completion length (tokens, EOS counted) on the fixed held-out rows, `batch_size`
    prompts per generation (None: all at once). Returns (accuracy, mean_length, [(prompt, completion, reward)]).
    Greedy decoding draws no random numbers, so evaluating never changes what training samples. Under torchrun
    each process evaluates an equal share (padded with rows that do not count) and the sums are taken over
    processes; the samples are this process's."""
    per_process = math.ceil(len(task.eval) / common.world_size())
    rows = task.eval[common.rank() * per_process : (common.rank() + 1) * per_process]
    counts = torch.tensor([1.0] * len(rows) + [0.0] * (per_process - len(rows)))
    rows, batch_size = rows + [task.eval[0]] * (per_process - len(rows)), batch_size or per_process
    rewards, lengths, samples = [], [], []
    for start in range(0, per_process, batch_size):
        batch = rows[start : start + batch_size]
        prompts = [common.format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in batch]
        rollout = common.generate(model, tokenizer, prompts, 1, max_new_tokens, 1.0, eos_ids, greedy=True)
        completions = common.decode_completions(tokenizer, rollout)
        rewards.append(score(task, completions, batch, 1))
        lengths.append(rollout.lengths.float().cpu())
        samples += [(r["prompt"], c, float(x)) for r, c, x in zip(batch, completions, rewards[-1])]
    sums = torch.stack([(torch.cat(rewards).eq(1.0).float() * counts).sum(), (torch.cat(lengths) * counts).sum()])
    correct, total_length = common.all_reduce(sums.to(next(model.parameters()).device), "sum").tolist()
    return correct / len(task.eval), total_length / len(task.eval), samples[: int(counts.sum())]
