"""Summarization, generation and reasoning tasks: loaders on local files of the Hub schemas,
preprocessing, evaluation paths on tiny models, and the smoke generators."""

from __future__ import annotations

import json

import pytest
import torch

from lamda_repro.tasks import metrics
from lamda_repro.tasks.base import DataFileError, TaskConfigError, get_task_class, task_types
from lamda_repro.tasks.generation import (
    CausalLMCollator,
    e2e_references_by_mr,
    encode_prompt_target,
    generation_kwargs,
    token_blocks,
)
from lamda_repro.tasks.smoke import generate

# -- helpers -----------------------------------------------------------------------------


def write_split_files(tmp_path, splits: dict[str, list[dict]], fmt: str = "jsonl") -> dict[str, str]:
    files = {}
    for split, rows in splits.items():
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            import pandas as pd

            pd.DataFrame(rows).to_parquet(path)
        files[split] = str(path)
    return files


def word_tokenizer(texts, model_type="gpt2"):
    from lamda_repro.models import build_word_tokenizer

    return build_word_tokenizer(texts, 500, model_type)


def tiny_gpt2(vocab_size: int, initializer_range: float = 0.02):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            initializer_range=initializer_range,
        )
    ).eval()


def texts_of(rows):
    for r in rows:
        for v in r.values():
            if isinstance(v, str):
                yield v
            elif isinstance(v, list):
                yield from v


XSUM_ROWS = [
    {"document": f"doc {i} says the cat sat .", "summary": f"cat {i} sat .", "id": str(i)} for i in range(6)
]
CNNDM_ROWS = [
    {"article": f"article {i} text .", "highlights": f"line {i} .\nsecond .", "id": f"h{i}"} for i in range(6)
]
E2E_ROWS = [
    {
        "meaning_representation": "name[the eagle], food[french]",
        "human_reference": "the eagle serves french food .",
    },
    {
        "meaning_representation": "name[the eagle], food[french]",
        "human_reference": "french food at the eagle .",
    },
    {"meaning_representation": "name[zizzi], food[indian]", "human_reference": "zizzi is indian ."},
]
GEM_E2E_ROWS = [
    {
        "gem_id": "e2e_nlg-validation-0",
        "meaning_representation": "name[the eagle], food[french]",
        "target": "the eagle serves french food .",
        "references": ["the eagle serves french food .", "french food at the eagle ."],
    },
    {
        "gem_id": "e2e_nlg-validation-1",
        "meaning_representation": "name[zizzi], food[indian]",
        "target": "zizzi is indian .",
        "references": [],
    },
]
WIKI_ROWS = [{"text": " = the otter = "}, {"text": ""}, {"text": " the otter eats fish . "}, {"text": ""}]
GSM_ROWS = [
    {"question": f"tom has {i} apples . how many apples ?", "answer": f"tom has {i} .\n#### {i}"}
    for i in range(5)
]


# -- registry and loaders ----------------------------------------------------------------


def test_task_types_are_registered_with_their_kinds():
    kinds = {
        t: get_task_class(t).task_kind for t in ("xsum", "cnn_dailymail", "e2e_nlg", "wikitext", "gsm8k")
    }
    assert kinds == {
        "xsum": "seq2seq",
        "cnn_dailymail": "seq2seq",
        "e2e_nlg": "causal-lm",
        "wikitext": "causal-lm",
        "gsm8k": "causal-lm",
    }
    assert {"xsum", "gsm8k"} <= set(task_types())


@pytest.mark.parametrize(
    "type_name, rows, fmt",
    [
        ("xsum", XSUM_ROWS, "jsonl"),
        ("cnn_dailymail", CNNDM_ROWS, "parquet"),
        ("e2e_nlg", E2E_ROWS, "jsonl"),
        ("e2e_nlg", GEM_E2E_ROWS, "parquet"),
        ("wikitext", WIKI_ROWS, "parquet"),
        ("gsm8k", GSM_ROWS, "jsonl"),
    ],
)
def test_loader_reads_local_files_of_the_hub_schema(tmp_path, type_name, rows, fmt):
    eval_split = "test" if type_name in ("gsm8k", "wikitext") else "validation"
    files = write_split_files(tmp_path, {"train": rows, eval_split: rows[:2]}, fmt)
    task = get_task_class(type_name)("t", {"max_train_samples": 3}, files)
    splits = task.load_splits()
    assert set(splits) == {"train", "eval"}
    assert len(splits["train"]) == min(3, len(rows)) and len(splits["eval"]) == 2
    assert set(splits["train"].column_names) == set(rows[0])


def test_loader_refuses_data_without_the_schema_columns(tmp_path):
    files = write_split_files(
        tmp_path,
        {"train": GSM_ROWS, "validation": GSM_ROWS},
    )
    with pytest.raises(DataFileError, match=r"train\.jsonl: row 1: missing column 'document'"):
        get_task_class("xsum")("t", {}, files).load_splits()


def test_explicit_eval_split_is_used(tmp_path):
    files = write_split_files(tmp_path, {"train": GSM_ROWS, "validation": GSM_ROWS[:1], "test": GSM_ROWS[:3]})
    assert len(get_task_class("gsm8k")("t", {}, files).load_splits()["eval"]) == 1
    assert len(get_task_class("gsm8k")("t", {"eval_split": "test"}, files).load_splits()["eval"]) == 3


def test_task_params_are_validated_in_one_line():
    from lamda_repro.config import ConfigError

    cls = get_task_class("e2e_nlg")
    cls.check_params({"type": "e2e_nlg", "hub_id": "GEM/e2e_nlg", "prompt_template": "{mr} =>"}, "tasks.e")
    with pytest.raises(ConfigError, match="tasks.e"):
        cls.check_params({"type": "e2e_nlg", "prompt_template": "no placeholder"}, "tasks.e")
    with pytest.raises(ConfigError, match="tasks.x"):
        get_task_class("xsum").check_params({"type": "xsum", "max_source_length": 0}, "tasks.x")


def test_unknown_generation_setting_is_refused():
    with pytest.raises(TaskConfigError, match="generation.beams"):
        generation_kwargs({"beams": 4}, {})
    assert generation_kwargs({"num_beams": 4}, {"max_new_tokens": 8}) == {
        "do_sample": False,
        "max_new_tokens": 8,
        "num_beams": 4,
    }


# -- preprocessing -----------------------------------------------------------------------


def test_causal_lm_labels_mask_the_prompt_and_end_with_eos():
    tok = word_tokenizer(["what is two plus two ? four"])
    enc = encode_prompt_target(tok, "what is two plus two ?", "four", max_length=32)
    n_prompt = len(tok("what is two plus two ?")["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][n_prompt:], skip_special_tokens=True) == "four"
    short = encode_prompt_target(tok, "what is two plus two ?", "four", max_length=4)
    assert len(short["input_ids"]) == len(short["labels"]) == 4


def test_collator_pads_right_with_minus_100_labels():
    collate = CausalLMCollator(pad_id=0)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_gsm8k_tokenize_trains_on_the_solution_only(tmp_path):
    files = write_split_files(tmp_path, {"train": GSM_ROWS, "validation": GSM_ROWS})
    task = get_task_class("gsm8k")("g", {"prompt_template": "{question} answer :"}, files)
    raw = task.load_splits()
    tok = word_tokenizer(list(texts_of(GSM_ROWS)) + ["answer :"])
    row = task.tokenize(raw["train"], tok, 64)[1]
    target = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
    assert tok.decode(target, skip_special_tokens=True) == "tom has 1 . #### 1"


def test_summarization_tokenize_truncates_sources_and_targets(tmp_path):
    files = write_split_files(tmp_path, {"train": XSUM_ROWS, "validation": XSUM_ROWS[:2]})
    task = get_task_class("xsum")("x", {"max_source_length": 5, "max_target_length": 3}, files)
    tok = word_tokenizer(texts_of(XSUM_ROWS), "bart")
    enc = task.tokenize(task.load_splits()["train"], tok, 64)
    assert set(enc.column_names) == {"input_ids", "attention_mask", "labels"}
    assert max(len(x) for x in enc["input_ids"]) == 5 and max(len(x) for x in enc["labels"]) == 3
    collated = task.data_collator(tok)([enc[0], enc[1]])
    assert (collated["labels"] == -100).sum() >= 0 and collated["input_ids"].shape[0] == 2


def test_wikitext_blocks_cover_the_stream():
    blocks = token_blocks(list(range(10)), 4, keep_last=True)
    assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert token_blocks(list(range(10)), 4, keep_last=False) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_e2e_groups_references_by_mr_in_both_schemas():
    mrs, refs = e2e_references_by_mr(E2E_ROWS)
    assert mrs == ["name[the eagle], food[french]", "name[zizzi], food[indian]"]
    assert refs == [["the eagle serves french food .", "french food at the eagle ."], ["zizzi is indian ."]]
    assert e2e_references_by_mr(GEM_E2E_ROWS) == (mrs, refs)


# -- evaluation paths on tiny (untrained) models ----------------------------------------


def test_wikitext_perplexity_equals_exp_of_the_mean_token_loss(tmp_path):
    files = write_split_files(tmp_path, {"train": WIKI_ROWS, "validation": WIKI_ROWS})
    task = get_task_class("wikitext")("w", {}, files)
    raw = task.load_splits()
    tok = word_tokenizer(texts_of(WIKI_ROWS), "llama")
    model = tiny_gpt2(len(tok))
    enc = task.tokenize(raw["eval"], tok, 4)
    result = task.evaluate(model, tok, raw["eval"], enc, batch_size=2)
    # reference: the model's own mean loss over each block, weighted by predicted tokens
    total, count = 0.0, 0
    for row in enc:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert result["eval_tokens"] == count
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_e2e_and_gsm8k_evaluate_by_generation(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)  # the Java METEOR test is `slow`
    e2e_files = write_split_files(tmp_path, {"train": E2E_ROWS, "validation": E2E_ROWS})
    e2e = get_task_class("e2e_nlg")("e", {}, e2e_files)
    raw = e2e.load_splits()
    tok = word_tokenizer(list(texts_of(E2E_ROWS + GSM_ROWS)) + ["question : answer : ||"])
    model = tiny_gpt2(len(tok))
    out = e2e.evaluate(model, tok, raw["eval"], None, 2, {"max_new_tokens": 5})
    assert out["num_mrs"] == 2 and 0.0 <= out["bleu"] <= 100.0 and out["nist"] >= 0.0

    gsm_dir = tmp_path / "gsm"
    gsm_dir.mkdir()
    gsm = get_task_class("gsm8k")("g", {}, write_split_files(gsm_dir, {"train": GSM_ROWS, "test": GSM_ROWS}))
    raw = gsm.load_splits()
    out = gsm.evaluate(model, tok, raw["eval"], None, 2, {"max_new_tokens": 5})
    assert set(out) == {"exact_match", "answered"} and 0.0 <= out["exact_match"] <= 1.0


def test_summarization_evaluate_generates_and_scores(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    files = write_split_files(tmp_path, {"train": XSUM_ROWS, "validation": XSUM_ROWS[:3]})
    task = get_task_class("xsum")("x", {}, files)
    raw = task.load_splits()
    tok = word_tokenizer(texts_of(XSUM_ROWS), "bart")
    torch.manual_seed(0)
    model = BartForConditionalGeneration(
        BartConfig(
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.bos_token_id,
        )
    ).eval()
    enc = task.tokenize(raw["eval"], tok, 32)
    out = task.evaluate(
        model, tok, raw["eval"], enc, 2, {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 4}
    )
    assert set(metrics.ROUGE_TYPES) <= set(out) and 0 <= out["gen_len"] <= 4


# -- smoke generators --------------------------------------------------------------------

GENERATORS = {
    "summary_pairs": {"document", "summary", "id"},
    "e2e_records": {"meaning_representation", "human_reference"},
    "wiki_corpus": {"text"},
    "arithmetic_problems": {"question", "answer"},
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_is_deterministic_and_has_the_hub_schema(name):
    first = generate(name, 30, 12, seed=3)
    assert first == generate(name, 30, 12, seed=3)
    assert first != generate(name, 30, 12, seed=4)
    assert len(first["train"]) == 30 and len(first["validation"]) == 12
    assert all(set(r) == GENERATORS[name] for rows in first.values() for r in rows)


def test_generator_schema_options():
    cnn = generate("summary_pairs", 4, 2, options={"schema": "cnn_dailymail"})
    assert set(cnn["train"][0]) == {"article", "highlights", "id"} and "\n" in cnn["train"][0]["highlights"]
    gem = generate("e2e_records", 6, 3, options={"schema": "gem"})
    assert set(gem["train"][0]) == {
        "gem_id",
        "gem_parent_id",
        "meaning_representation",
        "target",
        "references",
    }
    with pytest.raises(ValueError, match="schema"):
        generate("e2e_records", 6, 3, options={"schema": "csv"})
    with pytest.raises(ValueError, match="n_train"):
        generate("wiki_corpus", 0, 3)


def test_summary_is_a_function_of_the_key_sentence():
    for row in generate("summary_pairs", 20, 1)["train"]:
        words = row["summary"].split()
        role, name = words[1], words[2]
        assert f"{name} , the {role} from" in row["document"]


def test_e2e_eval_mrs_are_unseen_and_have_several_references():
    data = generate("e2e_records", 60, 30, options={"refs_per_mr": 3})
    train_mrs = {r["meaning_representation"] for r in data["train"]}
    mrs, refs = e2e_references_by_mr(data["validation"])
    assert not train_mrs & set(mrs)
    assert all(len(r) == 3 for r in refs)


def test_arithmetic_answers_are_correct_and_extractable():
    for row in generate("arithmetic_problems", 50, 5, options={"ops": "+-*"})["train"]:
        a, op, b = row["answer"].split(" = ")[0].split()[-3:]
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert metrics.extract_final_number(row["answer"]) == str(expected)


def test_batched_generation_with_left_padding_matches_one_by_one():
    from lamda_repro.tasks.generation import generate_continuations

    prompts = ["name[the eagle], food[french] ||", "name[zizzi] ||", "the eagle ||"]
    tok = word_tokenizer(list(texts_of(E2E_ROWS)) + prompts)
    model = tiny_gpt2(len(tok), initializer_range=0.5)  # large weights: outputs depend on the prompt
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    batched = generate_continuations(model, tok, prompts, 3, settings, 64)
    alone = [generate_continuations(model, tok, [p], 1, settings, 64)[0] for p in prompts]
    assert len(set(alone)) > 1
    assert batched == alone
