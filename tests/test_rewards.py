"""Reward parsers and task loaders in tasks.py. Every expected value below is worked out by hand."""

import itertools
import json
import operator
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import tasks  # noqa: E402
from common import UserError  # noqa: E402
from tasks import (PromptStream, arithmetic_reward, arithmetic_working, countdown_reward, countdown_task,  # noqa: E402
                   exact_reward, gsm8k_reference, load_task, numeric_answer, numeric_reward, safe_eval_arithmetic)

HOSTILE = "__import__('os').system('ls')"


@pytest.mark.parametrize("completion, answer, expected", [
    ("1239", 1239, 1.0),                                 # 1234+5 answered directly
    ("count 1235+4=1236+3=1237+2=1238+1=1239", 1239, 1.0),  # ... or after working
    (" 1239 \n", 1239, 1.0),                             # surrounding whitespace ignored
    ("=1239", 1239, 1.0), ("1238=1239", 1239, 1.0),      # the last word, after the last `=` or space, counts
    ("count 1239", 1239, 1.0), ("so 1238 or 1239", 1239, 1.0),
    ("1239=1238", 1239, -1.0), ("1239 1238", 1239, -1.0),
    ("01239", 1239, 1.0),                                # still exactly the integer 1239 (int("01239") == 1239)
    ("-3", -3, 1.0),
    ("count 1235+4=1236", 1239, -1.0),                   # stopped early
    ("count 1235+4=1236+3", 1239, -1.0),                 # cut inside the working: not a number
    ("1239+0+0+0+0", 1239, -1.0),                        # the ramble
    ("1238", 1239, -1.0), ("1239.", 1239, -1.0), ("1,239", 1239, -1.0), ("12 39", 1239, -1.0), ("", 1239, -1.0),
    ("1239-", 1239, -1.0), ("1239-0", 1239, -1.0),
    (HOSTILE, 1239, -1.0),
    ("9" * 5000, 1239, -1.0),                            # beyond int()'s 4300-digit limit: must score -1, not raise
    ("\u0661\u0662\u0663\u0669", 1239, -1.0),            # Arabic-Indic digits for 1239: ASCII digits only
])
def test_arithmetic_reward(completion, answer, expected):
    assert arithmetic_reward(completion, answer) == expected


@pytest.mark.parametrize("a, op, b, style, expected", [
    (1234, "+", 5, "direct", "1239"),
    (1234, "+", 5, "steps", "count 1235+4=1236+3=1237+2=1238+1=1239"),  # b - 1 = 4 steps, then the answer
    (1234, "-", 5, "steps", "count 1233-4=1232-3=1231-2=1230-1=1229"),
    (1238, "+", 3, "steps", "count 1239+2=1240+1=1241"),                 # a carry into the tens
    (2000, "-", 2, "steps", "count 1999-1=1998"),                        # a borrow through every digit
    (1234, "+", 1, "steps", "count 1235"),                               # b = 1: nothing to work
])
def test_arithmetic_working(a, op, b, style, expected):
    assert arithmetic_working(a, op, b, style) == expected
    assert arithmetic_reward(expected, a + b if op == "+" else a - b) == 1.0


@pytest.mark.parametrize("style, start", [("direct", "1230-0-0-0"), ("steps", "count 1231-1=1230-0-0-0")])
def test_arithmetic_ramble_never_answers(style, start):
    ramble = arithmetic_working(1232, "-", 2, style, ramble=True)
    assert ramble.startswith(start) and len(ramble) > 64  # past any completion budget
    assert arithmetic_reward(ramble, 1230) == -1.0
    # wherever it is cut past the answer (a cut right after it is a finished answer whose EOS was cut off)
    assert all(arithmetic_reward(ramble[:n], 1230) == -1.0 for n in range(len(start) - 5, len(ramble)))


@pytest.mark.parametrize("expression, expected", [
    ("(1 + 2) * 3", (Fraction(9), [1, 2, 3])),
    ("-3 + 5", (Fraction(2), [3, 5])),               # unary minus wraps the literal 3
    ("7 / 2", (Fraction(7, 2), [7, 2])),             # exact, not 3.5 or 3
    ("1000000000", (Fraction(10**9), [10**9])),      # the 1e9 bound itself is allowed
    ("1+" * 99 + "1", (Fraction(100), [1] * 100)),   # 199 chars: under the 200-char limit
])
def test_safe_eval_accepts(expression, expected):
    assert safe_eval_arithmetic(expression) == expected


@pytest.mark.parametrize("expression", [
    "1/0", "2**10", "9**9**9", "__import__('os')", "abs(-3)", "x + 1", "(1).real", "[1, 2]", "True + 1", "3 ^ 5", "",
    "1e3",                      # float literal
    "1" + "0" * 30,             # literal 1e30 > 1e9
    "1000000001",               # 1e9 + 1
    "999999999*999999999",      # literals fine, product ~1e18 overflows the bound
    "1000000000 + 1 - 1",       # intermediate 1e9 + 1 refused even though the result is 1e9
    "1+" * 100 + "1",           # 201 chars: over-long
])
def test_safe_eval_refuses(expression):
    start = time.perf_counter()
    assert safe_eval_arithmetic(expression) is None
    assert time.perf_counter() - start < 1.0  # 9**9**9 must be refused, not computed


PUZZLE = {"numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize("completion, answer, expected", [
    ("<answer> 3 * 5 + 7 </answer>", PUZZLE, 1.0),                   # 15 + 7 = 22
    ("Let me think. <answer>7 + 3 * 5 = 22</answer>", PUZZLE, 1.0),  # "= target" accepted
    ("<answer>(7 - 5 + 3) * 5 - 3</answer>", PUZZLE, 0.0),           # 5*5-3 = 22 but 3 and 5 twice
    ("<answer>5*5-3</answer>", PUZZLE, 0.0),                         # 22, but 5 twice and no 7
    ("<answer>5*5-3</answer>", {"numbers": [5, 5, 3], "target": 22}, 1.0),  # duplicates given: fine
    ("<answer>15 + 7</answer>", PUZZLE, 0.0),                        # 22, but 3 and 5 missing
    ("<answer>3 * 5 + 7 + 1 - 1</answer>", PUZZLE, 0.0),             # 22, but extra numbers
    ("<answer>3 * 5 - 7</answer>", PUZZLE, 0.0),                     # 8
    ("3 * 5 + 7", PUZZLE, 0.0),                                      # no tag
    ("3 * 5 + 7 = 22, so <answer>22</answer>", PUZZLE, 0.0),         # reasoning outside the tag
    ("<answer>3*5+7</answer> no: <answer>3+5+7</answer>", PUZZLE, 0.0),  # last tag (15) wins
    (f"<answer>{HOSTILE}</answer>", PUZZLE, 0.0),
    ("<answer>5**3 - 7</answer>", {"numbers": [3, 5, 7], "target": 118}, 0.0),  # 125 - 7, power refused
    ("<answer>" + "1+" * 200 + "1</answer>", PUZZLE, 0.0),
    ("<answer>3 * 5 + 7 = 99</answer>", PUZZLE, 0.0),              # 22, but the stated result is 99
    ("<answer>3 * 5 + 7 = 22 = 22</answer>", PUZZLE, 0.0),         # one "=" at most
    ("<answer>0x3 * 5 + 7</answer>", PUZZLE, 0.0),                 # 0x3 is 3, but numbers are written in decimal
    ("<answer>1_5 + 7</answer>", {"numbers": [15, 7], "target": 22}, 0.0),  # 1_5 is 15 to Python, not here
])
def test_countdown_reward(completion, answer, expected):
    assert countdown_reward(completion, answer) == expected


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>1,234</answer>", "1234", 1.0),
    ("<answer>1234</answer>", "1,234", 1.0),
    ("<answer>$18</answer>", "18", 1.0),
    ("<answer>18</answer>", "$18", 1.0),                    # reference '$' ignored too
    ("<answer>The answer is 18.</answer>", "18", 1.0),      # last number inside the tag
    ("The answer is 18", "18", 0.0),                        # no tag: no fallback
    ("18 <answer>I do not know</answer>", "18", 0.0),       # numbers outside the tag never count
    ("<answer>5</answer> wait, <answer>18</answer>", "18", 1.0),
    ("<answer>5 wait, <answer>18</answer>", "18", 1.0),    # an unclosed tag is not part of the last one
    ("<answer>The total is (18).</answer>", "18", 1.0), ("<answer>50%</answer>", "50", 1.0),
    ("<answer>18</answer> wait, <answer>5</answer>", "18", 0.0),
    ("<answer>18.0</answer>", "18", 1.0),                   # exact: 18.0 == 18
    ("<answer>18.5</answer>", "18", 0.0),                   # exact: no rounding
    ("<answer>17</answer>", "18", 0.0), ("<answer>-18</answer>", "18", 0.0), ("<answer></answer>", "18", 0.0),
    (f"<answer>{HOSTILE}</answer>", "18", 0.0),
    ("<answer>" + "9" * 5000 + "</answer>", "18", 0.0),
    ("<answer>1,8</answer>", "18", 0.0),                    # a comma only between thousands
    ("<answer>12,345,678</answer>", "12345678", 1.0),
    ("<answer>\uff11\uff18</answer>", "18", 0.0),           # fullwidth 18: ASCII digits only, as arithmetic_reward
])
def test_numeric_reward(completion, reference, expected):
    assert numeric_reward(completion, reference) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<answer>$1,234.50</answer>", Fraction(2469, 2)),  # 1234.5 = 2469/2
    ("<answer>-5</answer>", Fraction(-5)), ("<answer>none</answer>", None), ("no tag 5", None),
    ("<answer>-$5</answer>", Fraction(-5)), ("<answer>1/2</answer>", None), ("<answer>x is .5</answer>", None),
    ("<answer>3 boxes of 6 make 18</answer>", Fraction(18)),  # the last number word, not the first
])
def test_numeric_answer(completion, expected):
    assert numeric_answer(completion) == expected


def test_answer_tags_are_found_in_linear_time():
    # 20,000 unclosed tags (160,000 characters, a looping policy at a long budget): a tag that may span others
    # would be searched for from each of them to the end, 20,000 x 80,000 characters on average; one that holds no
    # <answer> stops at the next, 8 characters on
    start = time.perf_counter()
    assert numeric_reward("<answer>" * 20000, "18") == 0.0
    assert time.perf_counter() - start < 1.0


def test_gsm8k_reference():
    assert gsm8k_reference("Janet has 1,000 eggs and buys 234 more: <<1000+234=1234>>1,234\n#### 1,234") == "1234"
    assert gsm8k_reference("#### 18") == "18"


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>18.0</answer>", "18", 1.0),        # numeric reference: compared as numbers
    ("<answer>1,234</answer>", "1234", 1.0),
    ("<answer> Paris </answer>", "Paris", 1.0),  # text reference: exact, stripped
    ("<answer>Lyon</answer> <answer>Paris</answer>", "Paris", 1.0),
    ("<answer>paris</answer>", "Paris", 0.0), ("<answer>Paris, France</answer>", "Paris", 0.0),
    ("Paris", "Paris", 0.0),
])
def test_exact_reward(completion, reference, expected):
    assert exact_reward(completion, reference) == expected


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"jsonl:{path}"


@pytest.mark.parametrize("num_rows, num_eval", [(2, 1), (5, 1), (25, 2), (100, 10)])  # max(1, n // 10)
def test_jsonl_split(tmp_path, num_rows, num_eval):
    name = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(num_rows)])
    task = load_task(name)
    assert (len(task.train), len(task.eval)) == (num_rows - num_eval, num_eval)
    train, held = {r["prompt"] for r in task.train}, {r["prompt"] for r in task.eval}
    assert not train & held and train | held == {f"q{i}" for i in range(num_rows)}
    assert all(r["answer"] == r["prompt"][1:] for r in task.train + task.eval)  # answers kept, as text
    assert task.reward_fn("<answer>3</answer>", "3") == 1.0


GOOD = json.dumps({"prompt": "q", "answer": "a"})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, "", json.dumps({"prompt": "q"})], "line 3 needs both"),  # blank lines still count
    ([GOOD, "{not json"], "line 2 is not valid JSON"),
    (["[1, 2]", GOOD], "line 1 needs both"),
    ([GOOD], "at least 2 rows"),
    ([GOOD, json.dumps({"prompt": None, "answer": "a"})], "line 2's 'prompt' needs to be non-empty text"),  # not "None"
    ([json.dumps({"prompt": " ", "answer": "a"}), GOOD], "line 1's 'prompt' needs to be non-empty text"),
    ([GOOD, json.dumps({"prompt": "q", "answer": [1, 2]})], "line 2's 'answer' needs to be non-empty text or a number"),
    ([GOOD, json.dumps({"prompt": "q", "answer": True})], "line 2's 'answer' needs to be non-empty text or a number"),
    ([GOOD, json.dumps({"prompt": "q", "answer": " "})], "line 2's 'answer' needs to be non-empty text or a number"),
])
def test_jsonl_errors(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        load_task(write_jsonl(tmp_path / "d.jsonl", lines))


@pytest.mark.parametrize("content", [b'{"prompt": "q", "answer": 1}\n\xff\xfe\n', b'1' * 5000 + b"\n",
                                     b"[" * 100000 + b"\n"])  # too deep for the JSON parser
def test_jsonl_undecodable_is_user_error(tmp_path, content):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(UserError, match="line"):
        load_task(f"jsonl:{tmp_path / 'd.jsonl'}")


def test_jsonl_that_cannot_be_read_is_user_error(tmp_path, monkeypatch):
    # the tests run as root, whom chmod does not stop: opening the file raises as it would for another user
    name, path, real_open = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD]), str(tmp_path / "d.jsonl"), open

    def denied(file, *args, **kwargs):
        if str(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(UserError, match="d.jsonl: cannot read it"):
        load_task(name)


def test_jsonl_split_is_the_same_on_every_load(tmp_path):
    # a resumed run must hold out the same rows as the run it continues: 100 rows, 10 held out, twice
    name = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(100)])
    first, second = load_task(name), load_task(name)
    assert len(first.eval) == 10 and first.eval == second.eval and first.train == second.train


def test_jsonl_with_a_byte_order_mark(tmp_path):
    rows = [json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(2)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")  # the BOM starts line 1
    task = load_task(f"jsonl:{tmp_path / 'd.jsonl'}")
    assert sorted(r["prompt"] for r in task.train + task.eval) == ["q0", "q1"]


def test_jsonl_repeated_prompts_are_never_both_trained_on_and_held_out(tmp_path):
    # 5 prompts, each on 2 rows: max(1, 10 // 10) = 1 row held out; its twin leaves training: 10 - 1 - 1 = 8 rows
    name = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i % 5}", "answer": i % 5}) for i in range(10)])
    task = load_task(name)
    assert (len(task.train), len(task.eval)) == (8, 1)
    assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.eval}
    with pytest.raises(UserError, match="nothing is left to train on"):  # one prompt on every row
        load_task(write_jsonl(tmp_path / "e.jsonl", [json.dumps({"prompt": "q", "answer": i}) for i in range(10)]))


@pytest.mark.parametrize("answer", [18, None, "The answer is 18", "#### five", "#### 5 apples"])
def test_gsm8k_file_whose_answer_has_no_number_is_a_user_error(tmp_path, answer):
    good = json.dumps({"question": "q0", "answer": "2 + 2 = 4\n#### 4"})
    (tmp_path / "g.jsonl").write_text(good + "\n" + json.dumps({"question": "q1", "answer": answer}) + "\n")
    with pytest.raises(UserError, match=re.escape("line 2's 'answer' needs a number after '####'")):
        load_task(f"gsm8k:{tmp_path / 'g.jsonl'}")


def test_jsonl_missing_file_and_unknown_task(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        load_task(f"jsonl:{missing}")
    for name in ["gsm8k:", "jsonl:"]:  # an empty path (`gsm8k:$UNSET`) is a missing file, never the hub dataset
        with pytest.raises(UserError, match=re.escape(f"--task {name}: file not found")):
            load_task(name)
    for name in ["nope", "jsonl", "Arithmetic"]:
        with pytest.raises(UserError, match="unknown task"):
            load_task(name)


HELD_OUT = [{"prompt": p, "answer": x} for p, x in [("1234+5=", 1239), ("1234-5=", 1229), ("2000-3=", 1997)]]


def greedy_from_table(answers: dict, batches: list):
    """A stand-in for common.generate's greedy decoding: each prompt's completion from `answers`, EOS appended;
    notes the number of prompts of each call in `batches`."""
    def generate(model, tokenizer, prompts, group_size, max_new_tokens, temperature, eos_ids, greedy=False):
        batches.append(len(prompts))
        ids = [tokenizer(answers[p], add_special_tokens=False).input_ids + eos_ids[:1] for p in prompts]
        completion_ids = torch.tensor([x + eos_ids[:1] * (max(map(len, ids)) - len(x)) for x in ids])
        mask, lengths, truncated = common.completion_mask(completion_ids, eos_ids)
        no_prompt = torch.zeros(len(ids), 0, dtype=torch.long)
        return common.Rollout(no_prompt, no_prompt, completion_ids, mask, lengths, truncated, mask)
    return generate


@pytest.mark.parametrize("wrong", [-1.0, 0.0])  # arithmetic's reward, and the 0/1 of the other tasks
def test_evaluate_counts_accuracy_and_length_over_every_held_out_row(tiny, monkeypatch, wrong):
    # 3 held-out rows, generated 2 at a time by a stand-in for greedy decoding that answers from a table.
    # Lengths count the EOS: "1239" 4 + 1 = 5, "count 1233-1=1232" 17 + 1 = 18, "1997" 4 + 1 = 5.
    # Right: 1239 for 1234+5 and 1997 for 2000-3; 1232 for 1234-5 is wrong. Accuracy 2/3, mean length 28/3,
    # whether a wrong answer scores -1 or 0 (only a reward of 1 counts as right)
    model, tokenizer, eos_ids = tiny
    batches = []
    answers = {"1234+5=": "1239", "1234-5=": "count 1233-1=1232", "2000-3=": "1997"}
    monkeypatch.setattr(common, "generate", greedy_from_table(answers, batches))
    reward = arithmetic_reward if wrong == -1.0 else (lambda text, answer: max(arithmetic_reward(text, answer), 0.0))
    task = tasks.Task("arithmetic", HELD_OUT, HELD_OUT, reward, False)
    accuracy, length, samples = tasks.evaluate(model, tokenizer, task, 40, eos_ids, batch_size=2)
    assert batches == [2, 1]
    assert accuracy == pytest.approx(2 / 3) and length == pytest.approx(28 / 3)
    assert [reward for _, _, reward in samples] == [1.0, wrong, 1.0]


def test_evaluate_on_the_second_of_two_processes_counts_only_its_own_rows(tiny, monkeypatch):
    # 3 held-out rows over 2 processes: ceil(3/2) = 2 each, so process 1 takes row 2 ("2000-3=": "1997", right,
    # 5 tokens) plus row 0 again as padding, which must not count. With the sum over processes stubbed to this
    # process alone: accuracy 1/3 and length 5/3 over the 3 rows (counting the pad row: 2/3 and 10/3); 1 sample
    model, tokenizer, eos_ids = tiny
    answers = {"1234+5=": "1239", "2000-3=": "1997"}
    monkeypatch.setattr(common, "generate", greedy_from_table(answers, []))
    monkeypatch.setattr(common, "world_size", lambda: 2)
    monkeypatch.setattr(common, "rank", lambda: 1)
    monkeypatch.setattr(common, "all_reduce", lambda tensor, op="sum": tensor)
    task = tasks.Task("arithmetic", HELD_OUT, HELD_OUT, arithmetic_reward, False)
    accuracy, length, samples = tasks.evaluate(model, tokenizer, task, 40, eos_ids)
    assert accuracy == pytest.approx(1 / 3) and length == pytest.approx(5 / 3)
    assert samples == [("2000-3=", "1997", 1.0)]


def test_prompt_stream_resumes_its_shuffles():
    # 5 rows read 3 at a time: the second read crosses into a new pass, whose order the stream's RNG draws.
    # A stream built with another seed and given the first one's state must read what the first one reads next.
    first = tasks.PromptStream([{"i": i} for i in range(5)], seed=0)
    first.next(3)
    resumed = tasks.PromptStream(first.rows, seed=99)
    resumed.load_state_dict(first.state_dict())
    assert resumed.next(7) == first.next(7)


def test_the_tiny_model_builders_report(tiny, monkeypatch):
    # assets/make_tiny_model.py ends by reporting on its warm start through tasks.evaluate. The stand-in answers
    # 1239 (right), 1229-0-0-0 (a ramble, never the bare number: wrong) and 1997 (right): accuracy 2/3 = 0.667;
    # lengths with EOS 5, 10 + 1 = 11 and 5, mean 21/3 = 7.0; rambles 1/3 = 0.33.
    import importlib.util

    model, tokenizer, _ = tiny
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # what the builder sets on import, undone after the test
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "assets" / "make_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    answers = {"1234+5=": "1239", "1234-5=": "1229-0-0-0", "2000-3=": "1997"}
    monkeypatch.setattr(common, "generate", greedy_from_table(answers, []))
    report = builder.report(model, tokenizer, tasks.Task("arithmetic", HELD_OUT, HELD_OUT, arithmetic_reward, False))
    assert report.startswith("held-out greedy accuracy 0.667, mean length 7.0, rambles 0.33; e.g. [")


def test_arithmetic_task():
    task = load_task("arithmetic")
    assert (len(task.train), len(task.eval)) == (40000, 500)
    prompts = [r["prompt"] for r in task.train + task.eval]
    assert len(set(prompts)) == len(prompts)  # distinct, so train and held-out rows are disjoint
    for row in task.train + task.eval:
        a, op, b = re.fullmatch(r"([0-9]{4})([+-])([1-5])=", row["prompt"]).groups()
        assert 1010 <= int(a) <= 9989 and row["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert {r["prompt"][4] for r in task.eval} == {"+", "-"}
    assert load_task("arithmetic").eval == task.eval  # seeded: the same rows every time


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def chain_solution(numbers, target):
    """A left-to-right expression over some order of the numbers equal to target, as make_countdown builds."""
    for order in itertools.permutations(numbers):
        partial = [(Fraction(order[0]), str(order[0]))]
        for n in order[1:]:
            partial = [(f(v, n), f"({e} {op} {n})") for v, e in partial for op, f in OPS.items()]
        for value, expression in partial:
            if value == target:
                return expression
    return None


def test_countdown_task():
    task = countdown_task(num_train=200, num_eval=20)
    assert len(task.eval) == 20 and 0 < len(task.train) <= 200
    assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.eval}
    for row in task.eval:
        numbers, target = row["answer"]["numbers"], row["answer"]["target"]
        assert len(numbers) in (3, 4) and all(1 <= n <= 99 for n in numbers) and 1 <= target <= 999
        assert str(numbers) in row["prompt"] and f"equals {target}." in row["prompt"]
        solution = chain_solution(numbers, target)
        assert solution is not None, row
        assert countdown_reward(f"<answer>{solution}</answer>", row["answer"]) == 1.0


def test_countdown_train_holds_each_puzzle_once_and_none_held_out(monkeypatch):
    # force collisions: 10 puzzles ([n, 1] -> n + 1), each written with its numbers in either order
    def make(rng):
        numbers = [rng.randint(1, 10), 1][:: rng.choice([1, -1])]
        return {"prompt": str(numbers), "answer": {"numbers": numbers, "target": sum(numbers)}}

    monkeypatch.setattr(tasks, "make_countdown", make)
    task = countdown_task(num_train=100, num_eval=5)
    train = [tasks.countdown_puzzle(r) for r in task.train]
    assert train and len(set(train)) == len(train)
    assert not set(train) & {tasks.countdown_puzzle(r) for r in task.eval}


def test_prompt_stream():
    rows = list(range(5))
    stream = PromptStream(rows, seed=0)
    first = stream.next(3) + stream.next(2)
    assert sorted(first) == rows and sorted(stream.next(5)) == rows  # each pass is a permutation
    assert stream.position == 10
    assert PromptStream(rows, seed=0).next(5) == first  # seeded: reproducible
    assert sorted(PromptStream(rows, seed=1).next(7)[:5]) == rows  # a batch may span two passes
