"""Build tiny replicas of the Hub repositories config/paper.yaml names, file for file.

Each repository has a manifest in ``tests/hub/manifests/`` (id, kind, revisions and the files each
publishes with their formats, where and when the listing was read). ``build_replicas(root)`` writes,
for every manifest, one folder per revision holding exactly the listed files, in the listed format:
tokenizer files as published (a SentencePiece model trained here on a few lines where the repository
has only ``spm.model`` / ``tokenizer.model``), weights as ``.bin`` where only ``.bin`` is published,
sharded safetensors with their index where the repository shards, tiny configs of the same model
class, data in Parquet / JSON Lines + zstd / a loading script only. Files a manifest lists under
``not_replicated`` (TensorFlow, Flax, Rust, ONNX weights, logos) are never read by the suite's loaders
and are not written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

import yaml

MANIFESTS = Path(__file__).parent / "manifests"

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model reads a few lines of text and learns nothing much",
    "summaries are short ; articles are long and full of detail",
    "name [ the eagle ] , eattype [ coffee shop ] , food [ french ]",
    "question : how many apples are left if you eat two of five ? answer : 3",
    "the cat sat on the mat while the dog slept near the door",
    "paris is the capital of france and berlin is the capital of germany",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 and words mix in this line",
] * 4


def manifests() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(MANIFESTS.glob("*.yaml"))]


def manifest(repo_id: str) -> dict[str, Any]:
    for m in manifests():
        if m["id"] == repo_id:
            return m
    raise KeyError(repo_id)


# -- tokenizers ----------------------------------------------------------------------------


def train_spm(path: Path, model_type: str, specials: dict[str, tuple[int, str]], byte_fallback=False) -> None:
    """Train a SentencePiece model on TEXTS (ids/pieces of the special tokens as the repo has them)."""
    import sentencepiece as spm

    out = io.BytesIO()
    kwargs = {}
    for name in ("pad", "unk", "bos", "eos"):
        idx, piece = specials.get(name, (-1, ""))
        kwargs[f"{name}_id"] = idx
        if piece:
            kwargs[f"{name}_piece"] = piece
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_writer=out,
        vocab_size=400 if byte_fallback else 120,
        model_type=model_type,
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **kwargs,
    )
    path.write_bytes(out.getvalue())


def byte_level_bpe(folder: Path, specials: list[str], files: set[str]) -> None:
    """vocab.json + merges.txt (+ tokenizer.json) of a byte-level BPE tokenizer trained on TEXTS."""
    from tokenizers import ByteLevelBPETokenizer

    tk = ByteLevelBPETokenizer()
    tk.train_from_iterator(TEXTS, vocab_size=400, min_frequency=1, special_tokens=specials)
    if "vocab.json" in files:
        tk.save_model(str(folder))
    if "tokenizer.json" in files:
        tk.save(str(folder / "tokenizer.json"))


def fast_from_spm(folder: Path, tokenizer_class: str, specials: dict[str, tuple[int, str]]) -> None:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) converted from tokenizer.model by
    transformers' own SentencePiece conversion, as the repository publishes both."""
    import shutil

    from transformers import AutoTokenizer

    tmp = folder / ".spm-only"
    tmp.mkdir()
    shutil.copy(folder / "tokenizer.model", tmp / "tokenizer.model")
    config = {"tokenizer_class": tokenizer_class}
    config.update({f"{k}_token": piece for k, (_, piece) in specials.items()})
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(str(tmp))
    if len(tok) < 10:
        raise RuntimeError(f"{folder}: the SentencePiece model was not converted ({len(tok)} tokens)")
    shutil.rmtree(tmp)
    tok.save_pretrained(str(tmp))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp / name).exists():
            (tmp / name).rename(folder / name)
    shutil.rmtree(tmp)


# -- weights -------------------------------------------------------------------------------


def tiny_model(model_type: str, config: dict, auto: str, vocab_size: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size, **config)
    return getattr(transformers, auto).from_config(cfg)


def write_weights(model, folder: Path, files: set[str]) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    model.config.save_pretrained(str(folder))
    if "model.safetensors" in files:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if "pytorch_model.bin" in files:
        torch.save(state, folder / "pytorch_model.bin")
    shards = sorted(f for f in files if f.startswith("model-0000") and f.endswith(".safetensors"))
    if shards:
        keys = sorted(state)
        per = -(-len(keys) // len(shards))
        weight_map = {}
        for i, shard in enumerate(shards):
            part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in part})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# -- data ----------------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl_zst(path: Path, rows: list[dict]) -> None:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))


def readme_with_configs(configs: dict[str, dict[str, str]]) -> str:
    """A dataset card whose YAML header maps each config's splits to its data files (as the Hub's
    Parquet conversions write it)."""
    header = {
        "configs": [
            {"config_name": name, "data_files": [{"split": s, "path": p} for s, p in splits.items()]}
            for name, splits in configs.items()
        ]
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n# Replica (tiny, generated)\n"


# -- repository recipes --------------------------------------------------------------------


def rows_for(columns: dict[str, Any], n: int) -> list[dict]:
    """n rows whose values come from ``columns``: a callable of the row index or a constant."""
    return [{c: (v(i) if callable(v) else v) for c, v in columns.items()} for i in range(n)]


def text(i: int) -> str:
    return TEXTS[i % len(TEXTS)]


def build_model_revision(m: dict, folder: Path, files: set[str]) -> None:
    r = m["replica"]
    tok = r["tokenizer"]
    if tok["kind"] == "spm":  # the repository's tokenizer is a SentencePiece model file
        specials = {k: tuple(v) for k, v in tok["specials"].items()}
        train_spm(folder / tok["file"], tok["model_type"], specials, tok.get("byte_fallback", False))
        if "tokenizer.json" in files:
            fast_from_spm(folder, tok["class"], specials)
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=str(folder / tok["file"])).get_piece_size() + 1
    else:
        byte_level_bpe(folder, tok["specials"], files)
        vocab = 400
    for name, content in tok.get("files", {}).items():  # small JSON files written as published
        (folder / name).write_text(json.dumps(content))
    if "special_tokens_map.json" in files and not (folder / "special_tokens_map.json").exists():
        config = json.loads((folder / "tokenizer_config.json").read_text())
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        (folder / "special_tokens_map.json").write_text(
            json.dumps({k: config[k] for k in keys if k in config})
        )
    model = tiny_model(r["model_type"], r["config"], r.get("auto", "AutoModelForCausalLM"), vocab)
    write_weights(model, folder, files)
    if "generation_config.json" in files:
        model.generation_config.save_pretrained(str(folder))


def build_dataset_revision(m: dict, folder: Path, files: set[str]) -> None:
    r = m["replica"]
    columns = {c: _column(spec) for c, spec in r["columns"].items()}
    for f in files:
        path = folder / f
        if f.endswith(".parquet"):
            write_parquet(path, rows_for(columns, r.get("rows", 6)))
        elif f.endswith(".jsonl.zst"):
            write_jsonl_zst(path, rows_for(columns, r.get("rows", 6)))
        elif f.endswith(".jsonl"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows_for(columns, r.get("rows", 6))))
        elif f.endswith(".txt"):  # a script kept as text (never run)
            path.write_text("# loading script kept as text\n")
        elif f.endswith(".py"):  # a loading script, never run by datasets >= 4
            path.write_text(
                '"""Loading script (replica): datasets >= 4 refuses to run it."""\nimport datasets\n'
            )
    if "README.md" in files:
        configs = r.get("configs", {}).get(folder.name)
        card = readme_with_configs(configs) if configs else "# Dataset card (replica)\n"
        (folder / "README.md").write_text(card)


def _column(spec) -> Callable[[int], Any] | Any:
    if spec == "text":
        return text
    if spec == "index":
        return lambda i: i
    if isinstance(spec, dict) and "cycle" in spec:
        values = spec["cycle"]
        return lambda i: values[i % len(values)]
    if isinstance(spec, dict) and "choices" in spec:
        labels = spec["choices"]
        return lambda i: {"text": [f"{text(i + k)[:20]}" for k in range(len(labels))], "label": labels}
    if isinstance(spec, dict) and "list" in spec:
        return lambda i: [text(i + k)[:24] for k in range(spec["list"])]
    return spec


def build_replica(m: dict, root: Path) -> Path:
    kind = "models" if m["kind"] == "model" else "datasets"
    repo = root / kind / m["id"]
    revisions, commits = {}, {}
    for revdir, rev in m["revisions"].items():
        folder = repo / revdir
        folder.mkdir(parents=True, exist_ok=True)
        files = set(rev["files"])
        for name in files & {".gitattributes"}:
            (folder / name).write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        if m["kind"] == "model":
            build_model_revision(m, folder, files)
            if "README.md" in files:
                (folder / "README.md").write_text(f"---\nlicense: {m.get('license')}\n---\n# replica\n")
        else:
            build_dataset_revision(m, folder, files)
        for name in rev.get("names", []):
            revisions[name] = revdir
        if rev.get("commit"):
            commits[revdir] = rev["commit"]
            revisions[rev["commit"]] = revdir
    meta = {
        "gated": m.get("gated", False),
        "license": m.get("license"),
        "revisions": revisions,
        "commits": commits,
    }
    (repo / "repo.json").write_text(json.dumps(meta, indent=2))
    return repo


def build_replicas(root: Path) -> Path:
    for m in manifests():
        build_replica(m, Path(root))
    return Path(root)


def published_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
