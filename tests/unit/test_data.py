"""Spark-format records: every kind of bad record is a clear error naming its index, or is skipped and counted."""
import json

import pytest

from megatron_spark.data import DataError, PromptBuilder, PromptStream, check_lengths, load_records
from megatron_spark.fixtures.shapes import make_shapes_task


def write(tmp_path, records):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(records))
    return p


def rec(text="What?", image=None, answer="3"):
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": text}]
    return {"message": json.dumps([{"role": "user", "content": content}]), "answer": answer}


def test_good_records_text_and_image(tmp_path):
    task = make_shapes_task(tmp_path / "t", 4, seed=0)
    ex, rep = load_records(task)
    assert len(ex) == 4 and not rep.skipped and ex[0].image.endswith(".png") and ex[0].answer in "1234"
    ex, _ = load_records(write(tmp_path, [rec()]))
    assert ex[0].image is None and ex[0].question == "What?"


@pytest.mark.parametrize("bad,fragment", [
    ({"message": "[{not json", "answer": "1"}, "record 1: field 'message' is not valid JSON"),
    (rec(image="missing.png"), "record 1: image file 'missing.png' not found"),
    (rec(answer="  "), "record 1: empty or missing 'answer'"),
    ({"answer": "1"}, "record 1: missing field 'message'"),
    ("just a string", "record 1: expected an object"),
])
def test_bad_records(tmp_path, bad, fragment):
    path = write(tmp_path, [rec(), bad, rec()])
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_records(path)
    ex, rep = load_records(path, skip_bad=True)
    assert [e.index for e in ex] == [0, 2] and list(rep.skipped) == [1] and rep.total == 3


def test_whole_file_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(p)
    p.write_text("{}")
    with pytest.raises(DataError, match="must hold a JSON list"):
        load_records(p)


def test_prompt_over_length_limit(tmp_path, tiny_models):
    builder = PromptBuilder(tiny_models["vl_untied"], True, 3136, 3136)
    task = make_shapes_task(tmp_path / "t", 3, seed=1)
    ex, rep = load_records(task)
    n = len(builder.build(ex[0].messages).input_ids)
    assert check_lengths(ex, builder, n, False, rep) == ex
    with pytest.raises(DataError, match=r"record 0: prompt is \d+ tokens \(images included\), over "
                                        r"data.prompt_max_len=10"):
        check_lengths(ex, builder, 10, False, rep)
    assert check_lengths(ex, builder, 10, True, rep) == [] and len(rep.skipped) == 3


def test_stream_is_resumable(tmp_path):
    ex, _ = load_records(make_shapes_task(tmp_path / "t", 10, seed=2))
    a = PromptStream(ex, 4, seed=0)
    seen = [a.next_batch() for _ in range(3)]
    assert [e for e, _ in seen] == [0, 0, 1]  # 10 records, batches of 4: the third starts episode 1
    b = PromptStream(ex, 4, seed=0, cursor=type(a.cursor)(0, 4))
    assert [x.index for x in b.next_batch()[1]] == [x.index for x in seen[1][1]]
    with pytest.raises(DataError, match="only 10 usable records"):
        PromptStream(ex, 11, seed=0)


def test_control_tokens_in_question_text_are_rejected(tmp_path):
    with pytest.raises(DataError, match=r"record 0: the question text contains the control token <\|image_pad\|>"):
        load_records(write(tmp_path, [rec(text="look <|image_pad|> here")]))


@pytest.mark.slow
@pytest.mark.parametrize("bad,expected", [
    ({"message": json.dumps([{"role": "user", "content": [{"type": "image", "image": "nope.png"},
                                                          {"type": "text", "text": "q"}]}]), "answer": "1"},
     "record 3: image file 'nope.png' not found"),
    ({"message": "[{not json", "answer": "1"}, "record 3: field 'message' is not valid JSON"),
    ({"message": json.dumps([{"role": "user", "content": "q"}])}, "record 3: empty or missing 'answer'"),
])
def test_train_names_a_bad_record_before_any_process_starts(tmp_path, bad, expected):
    """A user's training file with a bad record 3: one error naming the file, the record and what is wrong; no
    traceback, no torchrun, no megatron-core warnings."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    good = {"message": json.dumps([{"role": "user", "content": [{"type": "text", "text": "What is 1 + 1?"}]}]),
            "answer": "2"}
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good, good, good, bad, good]))
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--config",
                        str(root / "examples" / "tiny_cpu.yaml"), "--nproc-per-node", "2", f"data.train_file={data}"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: data.train_file '{data}': {expected}" +
                                             p.stderr.strip().split(expected, 1)[1]], p.stderr
    assert "Traceback" not in p.stderr and "torchrun" not in p.stderr + p.stdout and "Warning" not in p.stderr
